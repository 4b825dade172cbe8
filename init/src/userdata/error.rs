//! Errors in user-data, image defaults and image definitions, located by file, line and column.

use std::fmt;

/// A problem in a user-data or defaults document. `line` and `column` are 1-based; both are 0
/// when the problem has no single place (for example undecodable bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDataError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl UserDataError {
    pub fn whole(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// A TOML syntax or type error, at the place the parser points to.
    pub fn from_toml(file: &str, text: &str, e: &toml::de::Error) -> Self {
        let message = e.message().trim().to_string();
        match e.span() {
            Some(span) => Self::at(file, text, span.start, message),
            None => Self::whole(file, message),
        }
    }

    /// An error at byte `offset` of `text`.
    pub fn at(file: &str, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = line_column(text, offset);
        Self {
            file: file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for UserDataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for UserDataError {}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_in_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(line_column(text, 6 + 6), (2, 6));
        let e = UserDataError::at("user-data", text, 6, "bad");
        assert_eq!(e.to_string(), "user-data:2:1: bad");
        assert_eq!(UserDataError::whole("f", "gone").to_string(), "f: gone");
    }
}
