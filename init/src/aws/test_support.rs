//! Real AWS client code for tests, from the `testkit` crate: moto_server (with IAM
//! authentication on and roles assumed through STS) and a Python with botocore. Tests fail,
//! never skip, without them (scripts/install-test-deps.sh installs them).

pub use testkit::{python_with_botocore, run_python, Moto};

/// Credentials from a moto STS AssumeRole.
pub type AssumedRole = testkit::roles::RoleCredentials;

/// What `start_with_roles` set up.
pub type MotoSetup = testkit::roles::MotoWithRoles;

/// The role as the IMDS emulator serves it.
pub fn role_config(role: &AssumedRole) -> crate::imds::emulator::RoleConfig {
    crate::imds::emulator::RoleConfig {
        name: role.role.clone(),
        access_key_id: role.access_key_id.clone(),
        secret_access_key: role.secret_access_key.clone(),
        token: role.token.clone(),
        expiration: role.expiration.clone(),
    }
}

/// moto with two assumed roles and the given SecureString parameters; IAM auth on.
pub fn start_with_roles(params: &[(&str, &str)]) -> MotoSetup {
    testkit::roles::start_with_roles(params)
}
