//! Talking to AWS from the agent: a SigV4 signer ([`sigv4`]) and SSM Parameter Store ([`ssm`]).

pub mod sigv4;
pub mod ssm;
pub mod tls;

#[cfg(test)]
pub(crate) mod test_support;
