//! Talking to AWS from the agent: a SigV4 signer ([`sigv4`]).

pub mod sigv4;

#[cfg(test)]
pub(crate) mod test_support;
