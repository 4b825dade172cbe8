//! Talking to AWS from the agent: a SigV4 signer ([`sigv4`]), the signed call every service
//! shares ([`request`]), SSM Parameter Store ([`ssm`]) and EC2's `CreateTags` ([`ec2`]).

pub mod ec2;
pub mod request;
pub mod sigv4;
pub mod ssm;
pub mod tls;

#[cfg(test)]
pub(crate) mod test_support;
