//! A minimal XML-RPC encoder and decoder: just what supervisord speaks.
//!
//! Values: `string` (and untyped `<value>text</value>`), `int`/`i4`/`i8`, `boolean`, `double`,
//! `array`, `struct`, `nil` (also `ex:nil`); `dateTime.iso8601` and `base64` decode to their
//! text as a string. Responses are either params or a `<fault>` with `faultCode`/`faultString`.
//! The XML reader knows elements, attributes (ignored), text, the five named entities,
//! numeric entities, CDATA, comments, processing instructions and a doctype-free prolog;
//! nothing else, and malformed input is an error, never a panic.

use std::fmt;

/// One XML-RPC value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    Double(f64),
    String(String),
    Array(Vec<Value>),
    /// Members in document order.
    Struct(Vec<(String, Value)>),
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_struct(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Struct(m) => Some(m),
            _ => None,
        }
    }

    /// A struct member by name (the last one if a name repeats).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_struct()?
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The XML-RPC type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "int",
            Value::Double(_) => "double",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Struct(_) => "struct",
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

/// A `<fault>` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub code: i64,
    pub message: String,
}

/// A decoded `<methodResponse>`.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Success(Value),
    Fault(Fault),
}

/// Why a document could not be decoded; `offset` is a byte offset into the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub message: String,
    pub offset: usize,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed XML-RPC at byte {}: {}",
            self.offset, self.message
        )
    }
}

impl std::error::Error for DecodeError {}

fn err<T>(offset: usize, message: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError {
        message: message.into(),
        offset,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Escape text for XML character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // A bare CR would be normalised away by the receiving XML parser.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

fn encode_value(v: &Value, out: &mut String) {
    out.push_str("<value>");
    match v {
        Value::Nil => out.push_str("<nil/>"),
        Value::Bool(b) => {
            out.push_str(if *b {
                "<boolean>1</boolean>"
            } else {
                "<boolean>0</boolean>"
            });
        }
        Value::Int(i) => {
            // Plain XML-RPC ints are 32 bits; larger ones need the i8 extension.
            let tag = if i32::try_from(*i).is_ok() {
                "int"
            } else {
                "i8"
            };
            out.push_str(&format!("<{tag}>{i}</{tag}>"));
        }
        Value::Double(d) => {
            // `{:?}` keeps a decimal point and round-trips exactly.
            out.push_str(&format!("<double>{d:?}</double>"));
        }
        Value::String(s) => {
            out.push_str("<string>");
            out.push_str(&escape(s));
            out.push_str("</string>");
        }
        Value::Array(items) => {
            out.push_str("<array><data>");
            for item in items {
                encode_value(item, out);
            }
            out.push_str("</data></array>");
        }
        Value::Struct(members) => {
            out.push_str("<struct>");
            for (name, value) in members {
                out.push_str("<member><name>");
                out.push_str(&escape(name));
                out.push_str("</name>");
                encode_value(value, out);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
    }
    out.push_str("</value>");
}

/// A `<methodCall>` document.
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodCall><methodName>");
    out.push_str(&escape(method));
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        encode_value(p, &mut out);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>\n");
    out
}

/// A successful `<methodResponse>` document, for the tests' fake servers (the agent only calls).
#[cfg(test)]
pub fn encode_response(value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><params><param>");
    encode_value(value, &mut out);
    out.push_str("</param></params></methodResponse>\n");
    out
}

/// A `<fault>` `<methodResponse>` document, for the tests' fake servers.
#[cfg(test)]
pub fn encode_fault(fault: &Fault) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n<methodResponse><fault>");
    encode_value(
        &Value::Struct(vec![
            ("faultCode".into(), Value::Int(fault.code)),
            ("faultString".into(), Value::String(fault.message.clone())),
        ]),
        &mut out,
    );
    out.push_str("</fault></methodResponse>\n");
    out
}

// ---------------------------------------------------------------------------------------------
// A tiny XML reader

const MAX_DEPTH: usize = 128;

#[derive(Debug)]
struct Element {
    name: String,
    offset: usize,
    children: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    /// Child elements, refusing non-whitespace text between them.
    fn elements(&self) -> Result<Vec<&Element>, DecodeError> {
        let mut out = Vec::new();
        for child in &self.children {
            match child {
                Node::Element(e) => out.push(e),
                Node::Text(t) if t.trim().is_empty() => {}
                Node::Text(t) => {
                    return err(
                        self.offset,
                        format!("unexpected text {:?} inside <{}>", short(t), self.name),
                    )
                }
            }
        }
        Ok(out)
    }

    /// The only child element, which must be named `name`.
    fn only(&self, name: &str) -> Result<&Element, DecodeError> {
        let children = self.elements()?;
        match children.as_slice() {
            [one] if one.name == name => Ok(one),
            [one] => err(
                one.offset,
                format!(
                    "expected <{name}> inside <{}>, found <{}>",
                    self.name, one.name
                ),
            ),
            [] => err(
                self.offset,
                format!("expected <{name}> inside <{}>, found nothing", self.name),
            ),
            _ => err(
                self.offset,
                format!(
                    "expected only <{name}> inside <{}>, found {} elements",
                    self.name,
                    children.len()
                ),
            ),
        }
    }

    /// The text content, refusing child elements.
    fn text(&self) -> Result<String, DecodeError> {
        let mut s = String::new();
        for child in &self.children {
            match child {
                Node::Text(t) => s.push_str(t),
                Node::Element(e) => {
                    return err(
                        e.offset,
                        format!("unexpected <{}> inside <{}>", e.name, self.name),
                    )
                }
            }
        }
        Ok(s)
    }
}

fn short(s: &str) -> String {
    let t = s.trim();
    if t.chars().count() > 40 {
        format!("{}...", t.chars().take(40).collect::<String>())
    } else {
        t.to_string()
    }
}

struct Reader<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn skip_until(&mut self, end: &str, what: &str) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        match self.rest().find(end) {
            Some(i) => {
                let s = &self.src[start..start + i];
                self.pos = start + i + end.len();
                Ok(s)
            }
            None => err(start, format!("unterminated {what}")),
        }
    }

    /// Skip whitespace, comments and processing instructions (prolog and epilog).
    fn skip_misc(&mut self) -> Result<(), DecodeError> {
        loop {
            let trimmed = self.rest().trim_start();
            self.pos = self.src.len() - trimmed.len();
            if trimmed.starts_with("<?") {
                self.skip_until("?>", "processing instruction")?;
            } else if trimmed.starts_with("<!--") {
                self.skip_until("-->", "comment")?;
            } else if trimmed.starts_with("<!") {
                return err(self.pos, "DOCTYPE and other declarations are not supported");
            } else {
                return Ok(());
            }
        }
    }

    fn document(&mut self) -> Result<Element, DecodeError> {
        // A UTF-8 byte order mark is allowed.
        if self.rest().starts_with('\u{feff}') {
            self.pos += '\u{feff}'.len_utf8();
        }
        self.skip_misc()?;
        if !self.rest().starts_with('<') {
            if self.rest().is_empty() {
                return err(self.pos, "empty document");
            }
            return err(
                self.pos,
                format!("expected an XML element, found {:?}", short(self.rest())),
            );
        }
        let root = self.element(0)?;
        self.skip_misc()?;
        if !self.rest().is_empty() {
            return err(self.pos, format!("trailing content after </{}>", root.name));
        }
        Ok(root)
    }

    fn name(&mut self) -> Result<String, DecodeError> {
        let start = self.pos;
        let end = self
            .rest()
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/' || c == '=')
            .map(|i| start + i)
            .unwrap_or(self.src.len());
        if end == start {
            return err(start, "expected a tag name");
        }
        self.pos = end;
        Ok(self.src[start..end].to_string())
    }

    /// Parse one element starting at `<`.
    fn element(&mut self, depth: usize) -> Result<Element, DecodeError> {
        if depth > MAX_DEPTH {
            return err(self.pos, format!("elements nested deeper than {MAX_DEPTH}"));
        }
        let offset = self.pos;
        debug_assert!(self.rest().starts_with('<'));
        self.pos += 1;
        let name = self.name()?;
        // Attributes: skipped, but quoted values may contain '>' so walk them.
        let self_closing;
        loop {
            let trimmed = self.rest().trim_start();
            self.pos = self.src.len() - trimmed.len();
            if trimmed.starts_with("/>") {
                self.pos += 2;
                self_closing = true;
                break;
            } else if trimmed.starts_with('>') {
                self.pos += 1;
                self_closing = false;
                break;
            } else if trimmed.is_empty() {
                return err(offset, format!("unterminated tag <{name}"));
            }
            self.name()?;
            let t = self.rest().trim_start();
            self.pos = self.src.len() - t.len();
            if !t.starts_with('=') {
                return err(self.pos, format!("attribute without a value in <{name}>"));
            }
            self.pos += 1;
            let t = self.rest().trim_start();
            self.pos = self.src.len() - t.len();
            let quote = match t.chars().next() {
                Some(q @ ('"' | '\'')) => q,
                _ => return err(self.pos, format!("unquoted attribute value in <{name}>")),
            };
            self.pos += 1;
            let q = quote.to_string();
            self.skip_until(&q, "attribute value")?;
        }
        let mut el = Element {
            name,
            offset,
            children: Vec::new(),
        };
        if self_closing {
            return Ok(el);
        }
        let mut text = String::new();
        loop {
            let rest = self.rest();
            if rest.is_empty() {
                return err(offset, format!("<{}> is never closed", el.name));
            }
            if rest.starts_with("</") {
                let close_at = self.pos;
                self.pos += 2;
                let close = self.name()?;
                let t = self.rest().trim_start();
                self.pos = self.src.len() - t.len();
                if !t.starts_with('>') {
                    return err(self.pos, format!("malformed closing tag </{close}"));
                }
                self.pos += 1;
                if close != el.name {
                    return err(close_at, format!("</{close}> closes <{}>", el.name));
                }
                if !text.is_empty() {
                    el.children.push(Node::Text(std::mem::take(&mut text)));
                }
                return Ok(el);
            } else if rest.starts_with("<!--") {
                self.skip_until("-->", "comment")?;
            } else if rest.starts_with("<![CDATA[") {
                self.pos += "<![CDATA[".len();
                let data = self.skip_until("]]>", "CDATA section")?;
                text.push_str(data);
            } else if rest.starts_with("<?") {
                self.skip_until("?>", "processing instruction")?;
            } else if rest.starts_with('<') {
                if !text.is_empty() {
                    el.children.push(Node::Text(std::mem::take(&mut text)));
                }
                let child = self.element(depth + 1)?;
                el.children.push(Node::Element(child));
            } else {
                let start = self.pos;
                let end = rest.find('<').map(|i| start + i).unwrap_or(self.src.len());
                text.push_str(&unescape_at(&self.src[start..end], start)?);
                self.pos = end;
            }
        }
    }
}

/// Replace XML entities (`&amp;` `&lt;` `&gt;` `&quot;` `&apos;` `&#NN;` `&#xHH;`) and
/// normalise line ends as an XML parser does.
pub fn unescape(s: &str) -> Result<String, DecodeError> {
    unescape_at(s, 0)
}

fn unescape_at(s: &str, base: usize) -> Result<String, DecodeError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut offset = base;
    while let Some(i) = rest.find(['&', '\r']) {
        out.push_str(&rest[..i]);
        offset += i;
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix('\r') {
            // XML end-of-line handling: CRLF and lone CR become LF.
            out.push('\n');
            rest = r.strip_prefix('\n').unwrap_or(r);
            offset = base + (s.len() - rest.len());
            continue;
        }
        let Some(semi) = rest.find(';') else {
            return err(
                offset,
                "'&' without a closing ';' (a bare & must be written &amp;)",
            );
        };
        let entity = &rest[1..semi];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse::<u32>().ok()
                } else {
                    return err(offset, format!("unknown entity &{};", short(entity)));
                };
                match code.and_then(char::from_u32) {
                    Some(c) if c != '\0' => c,
                    _ => {
                        return err(
                            offset,
                            format!("invalid character reference &{};", short(entity)),
                        )
                    }
                }
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
        offset = base + (s.len() - rest.len());
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Decoding

fn decode_value(v: &Element) -> Result<Value, DecodeError> {
    if v.name != "value" {
        return err(v.offset, format!("expected <value>, found <{}>", v.name));
    }
    // Untyped text is a string; whitespace around it counts.
    if !v.children.iter().any(|c| matches!(c, Node::Element(_))) {
        return Ok(Value::String(v.text()?));
    }
    let typed = match v.elements() {
        Ok(c) if c.len() == 1 => c[0],
        Ok(_) => return err(v.offset, "more than one typed element inside <value>"),
        Err(_) => return err(v.offset, "text mixed with a typed element inside <value>"),
    };
    let t = typed;
    let name = t.name.as_str();
    match name {
        "string" => Ok(Value::String(t.text()?)),
        "int" | "i4" | "i8" => {
            let s = t.text()?;
            let s = s.trim();
            let s = s.strip_prefix('+').unwrap_or(s);
            match s.parse::<i64>() {
                Ok(i) => Ok(Value::Int(i)),
                Err(_) => err(
                    t.offset,
                    format!("<{name}> holds {:?}, not an integer", short(s)),
                ),
            }
        }
        "boolean" => match t.text()?.trim() {
            "1" | "true" => Ok(Value::Bool(true)),
            "0" | "false" => Ok(Value::Bool(false)),
            other => err(
                t.offset,
                format!("<boolean> holds {:?}, not 0 or 1", short(other)),
            ),
        },
        "double" => {
            let s = t.text()?;
            match s.trim().parse::<f64>() {
                Ok(d) => Ok(Value::Double(d)),
                Err(_) => err(
                    t.offset,
                    format!("<double> holds {:?}, not a number", short(&s)),
                ),
            }
        }
        "nil" | "ex:nil" => {
            if t.text()?.trim().is_empty() {
                Ok(Value::Nil)
            } else {
                err(t.offset, "<nil> must be empty")
            }
        }
        "dateTime.iso8601" | "base64" => Ok(Value::String(t.text()?.trim().to_string())),
        "array" => {
            let data = t.only("data")?;
            let mut items = Vec::new();
            for item in data.elements()? {
                items.push(decode_value(item)?);
            }
            Ok(Value::Array(items))
        }
        "struct" => {
            let mut members = Vec::new();
            for m in t.elements()? {
                if m.name != "member" {
                    return err(
                        m.offset,
                        format!("expected <member> inside <struct>, found <{}>", m.name),
                    );
                }
                let parts = m.elements()?;
                let (name_el, value_el) = match parts.as_slice() {
                    [a, b] if a.name == "name" && b.name == "value" => (a, b),
                    [a, b] if a.name == "value" && b.name == "name" => (b, a),
                    _ => return err(m.offset, "a <member> needs one <name> and one <value>"),
                };
                members.push((name_el.text()?, decode_value(value_el)?));
            }
            Ok(Value::Struct(members))
        }
        other => err(t.offset, format!("unknown XML-RPC type <{other}>")),
    }
}

fn parse(body: &str) -> Result<Element, DecodeError> {
    Reader { src: body, pos: 0 }.document()
}

/// Decode a `<methodResponse>`: its one param, or its fault.
pub fn decode_response(body: &str) -> Result<Response, DecodeError> {
    let root = parse(body)?;
    if root.name != "methodResponse" {
        return err(
            root.offset,
            format!("expected <methodResponse>, found <{}>", root.name),
        );
    }
    let children = root.elements()?;
    let inner = match children.as_slice() {
        [one] => *one,
        [] => return err(root.offset, "empty <methodResponse>"),
        _ => return err(root.offset, "<methodResponse> holds more than one element"),
    };
    match inner.name.as_str() {
        "params" => {
            let param = inner.only("param")?;
            let value = decode_value(param.only("value")?)?;
            Ok(Response::Success(value))
        }
        "fault" => {
            let v = decode_value(inner.only("value")?)?;
            let code = v.get("faultCode").and_then(Value::as_int);
            let message = v.get("faultString").and_then(Value::as_str);
            match (code, message) {
                (Some(code), Some(message)) => Ok(Response::Fault(Fault {
                    code,
                    message: message.to_string(),
                })),
                _ => err(
                    inner.offset,
                    "a <fault> needs a struct with an int faultCode and a string faultString",
                ),
            }
        }
        other => err(
            inner.offset,
            format!("expected <params> or <fault> in <methodResponse>, found <{other}>"),
        ),
    }
}

/// Decode a `<methodCall>` into the method name and its params (for tests and fake servers).
#[cfg(test)]
pub fn decode_call(body: &str) -> Result<(String, Vec<Value>), DecodeError> {
    let root = parse(body)?;
    if root.name != "methodCall" {
        return err(
            root.offset,
            format!("expected <methodCall>, found <{}>", root.name),
        );
    }
    let mut method = None;
    let mut params = Vec::new();
    for child in root.elements()? {
        match child.name.as_str() {
            "methodName" => method = Some(child.text()?.trim().to_string()),
            "params" => {
                for p in child.elements()? {
                    if p.name != "param" {
                        return err(p.offset, format!("expected <param>, found <{}>", p.name));
                    }
                    params.push(decode_value(p.only("value")?)?);
                }
            }
            other => {
                return err(
                    child.offset,
                    format!("unexpected <{other}> in <methodCall>"),
                )
            }
        }
    }
    match method {
        Some(m) if !m.is_empty() => Ok((m, params)),
        _ => err(root.offset, "<methodCall> without a <methodName>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested() -> Value {
        Value::Struct(vec![
            ("name".into(), Value::str("web <&> \"'\r\n é ☺")),
            ("pid".into(), Value::Int(1234)),
            ("big".into(), Value::Int(1 << 40)),
            ("neg".into(), Value::Int(-7)),
            ("ok".into(), Value::Bool(true)),
            ("no".into(), Value::Bool(false)),
            ("ratio".into(), Value::Double(0.1)),
            ("none".into(), Value::Nil),
            ("empty".into(), Value::str("")),
            (
                "list".into(),
                Value::Array(vec![
                    Value::Array(vec![]),
                    Value::Struct(vec![]),
                    Value::Array(vec![Value::str("a"), Value::Int(2)]),
                    Value::Struct(vec![("x & y".into(), Value::Array(vec![Value::Nil]))]),
                ]),
            ),
        ])
    }

    #[test]
    fn call_round_trips_nested_values() {
        let params = vec![nested(), Value::str("x"), Value::Bool(true)];
        let doc = encode_call("supervisor.startProcess", &params);
        assert!(doc.starts_with("<?xml version=\"1.0\"?>"));
        assert!(doc.contains("<i8>1099511627776</i8>"));
        assert!(doc.contains("&lt;&amp;&gt;"));
        let (method, back) = decode_call(&doc).unwrap();
        assert_eq!(method, "supervisor.startProcess");
        assert_eq!(back, params);
    }

    #[test]
    fn response_and_fault_round_trip() {
        let v = nested();
        assert_eq!(
            decode_response(&encode_response(&v)).unwrap(),
            Response::Success(v)
        );
        let f = Fault {
            code: 10,
            message: "BAD_NAME: a <b>".into(),
        };
        assert_eq!(
            decode_response(&encode_fault(&f)).unwrap(),
            Response::Fault(f)
        );
    }

    #[test]
    fn decodes_python_xmlrpclib_output() {
        // As supervisord (Python's xmlrpclib) writes it: newlines between elements, an
        // untyped value, i4, a double in exponent form, nil, a comment and CDATA.
        let doc = "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n\
            <value><array><data>\n<value><struct>\n<member>\n<name>name</name>\n\
            <value><string>web</string></value>\n</member>\n<member>\n<name>pid</name>\n\
            <value><i4>42</i4></value>\n</member>\n<member>\n<value>  untyped  </value>\n\
            <name>text</name>\n</member>\n</struct></value>\n<value><double>-1.5e3</double></value>\n\
            <value><nil/></value>\n<value><ex:nil></ex:nil></value>\n<!-- c -->\
            <value><string><![CDATA[a<b&c]]>&#65;&#x263a;</string></value>\n\
            <value><boolean>0</boolean></value>\n\
            <value><int> +7 </int></value>\n\
            </data></array></value>\n</param>\n</params>\n</methodResponse>\n";
        let Response::Success(v) = decode_response(doc).unwrap() else {
            panic!("not a success")
        };
        let items = v.as_array().unwrap();
        assert_eq!(items[0].get("name").and_then(Value::as_str), Some("web"));
        assert_eq!(items[0].get("pid").and_then(Value::as_int), Some(42));
        assert_eq!(
            items[0].get("text").and_then(Value::as_str),
            Some("  untyped  ")
        );
        assert_eq!(items[1], Value::Double(-1500.0));
        assert_eq!(items[2], Value::Nil);
        assert_eq!(items[3], Value::Nil);
        assert_eq!(items[4], Value::str("a<b&cA☺"));
        assert_eq!(items[5], Value::Bool(false));
        assert_eq!(items[6], Value::Int(7));
    }

    #[test]
    fn decodes_supervisord_fault() {
        let doc = "<?xml version='1.0'?>\n<methodResponse>\n<fault>\n<value><struct>\n\
            <member>\n<name>faultCode</name>\n<value><int>70</int></value>\n</member>\n\
            <member>\n<name>faultString</name>\n<value><string>NOT_RUNNING: a</string></value>\n\
            </member>\n</struct></value>\n</fault>\n</methodResponse>\n";
        assert_eq!(
            decode_response(doc).unwrap(),
            Response::Fault(Fault {
                code: 70,
                message: "NOT_RUNNING: a".into()
            })
        );
    }

    #[test]
    fn escaping_and_unescaping() {
        assert_eq!(
            escape("a&b<c>d\"e'f\rg"),
            "a&amp;b&lt;c&gt;d&quot;e&apos;f&#13;g"
        );
        assert_eq!(
            unescape("&amp;&lt;&gt;&quot;&apos;&#65;&#x42;&#X43;&#233;").unwrap(),
            "&<>\"'ABCé"
        );
        assert_eq!(unescape("a\r\nb\rc").unwrap(), "a\nb\nc");
        assert_eq!(unescape("&#13;").unwrap(), "\r");
        for bad in [
            "&",
            "a & b",
            "&nbsp;",
            "&#;",
            "&#xZZ;",
            "&#0;",
            "&#x110000;",
            "&#xD800;",
        ] {
            assert!(unescape(bad).is_err(), "{bad:?} should not unescape");
        }
        let s = "every <special> & \"char\" '\r\n\t";
        assert_eq!(unescape(&escape(s)).unwrap(), s);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let cases = [
            ("", "empty document"),
            ("   ", "empty document"),
            ("hello", "expected an XML element"),
            ("<methodResponse>", "never closed"),
            ("<methodResponse><params></methodResponse>", "closes"),
            ("<methodCall/>", "expected <methodResponse>"),
            ("<methodResponse/>", "empty <methodResponse>"),
            ("<methodResponse><params/></methodResponse>", "expected <param>"),
            (
                "<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>",
                "not an integer",
            ),
            (
                "<methodResponse><params><param><value><int>99999999999999999999</int></value></param></params></methodResponse>",
                "not an integer",
            ),
            (
                "<methodResponse><params><param><value><boolean>2</boolean></value></param></params></methodResponse>",
                "not 0 or 1",
            ),
            (
                "<methodResponse><params><param><value><double>fast</double></value></param></params></methodResponse>",
                "not a number",
            ),
            (
                "<methodResponse><params><param><value><date>1</date></value></param></params></methodResponse>",
                "unknown XML-RPC type",
            ),
            (
                "<methodResponse><params><param><value><struct><member><name>a</name></member></struct></value></param></params></methodResponse>",
                "one <name> and one <value>",
            ),
            (
                "<methodResponse><params><param><value><array><value/></array></value></param></params></methodResponse>",
                "expected <data>",
            ),
            (
                "<methodResponse><params><param><value>x<string>y</string></value></param></params></methodResponse>",
                "text mixed",
            ),
            (
                "<methodResponse><fault><value><struct></struct></value></fault></methodResponse>",
                "faultCode",
            ),
            ("<methodResponse></methodResponse> trailing", "trailing content"),
            ("<methodResponse a=b></methodResponse>", "unquoted attribute"),
            ("<methodResponse a=\"b></methodResponse>", "unterminated attribute"),
            ("<!DOCTYPE x><methodResponse/>", "DOCTYPE"),
            ("<methodResponse><!-- x", "unterminated comment"),
            ("<methodResponse>&bogus;</methodResponse>", "unknown entity"),
            ("<", "expected a tag name"),
        ];
        for (doc, want) in cases {
            match decode_response(doc) {
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{doc:?}: error {e} should mention {want:?}"
                ),
                Ok(r) => panic!("{doc:?} decoded to {r:?}"),
            }
        }
        let deep = "<value><array><data>".repeat(200) + &"</data></array></value>".repeat(200);
        let doc =
            format!("<methodResponse><params><param>{deep}</param></params></methodResponse>");
        assert!(decode_response(&doc)
            .unwrap_err()
            .to_string()
            .contains("nested deeper"));
        assert!(decode_call("<methodCall><params/></methodCall>").is_err());
    }

    #[test]
    fn attributes_are_skipped_even_with_angle_brackets() {
        let doc = "<methodResponse x='a>b' y = \"c\"><params><param><value><string>ok</string></value></param></params></methodResponse>";
        assert_eq!(
            decode_response(doc).unwrap(),
            Response::Success(Value::str("ok"))
        );
    }
}
