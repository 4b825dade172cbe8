//! The trust store for the agent's own HTTPS (SSM): the system's, read when a client is made.
//! ureq's default store is read once per process, when its first client is built, which is the
//! IMDS client at the start of the boot, before the boot's trust step has installed the
//! user-data's `ca_certificates`: a VPC endpoint or a proxy signed by such a CA would never be
//! trusted. (Found by the e2e boot that reads its token from SSM over TLS.)

use std::sync::Arc;

/// A TLS client configuration trusting what the system trusts now (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` when set, else the distribution's bundle, found the way OpenSSL finds it).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match rustls_native_certs::load_native_certs() {
        Ok(certs) => {
            let (trusted, unusable) = roots.add_parsable_certificates(certs);
            tracing::debug!(trusted, unusable, "read the system trust store");
        }
        Err(e) => tracing::warn!(
            "reading the system trust store: {e}; HTTPS to AWS will fail until the \
             ca-certificates package is installed"
        ),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
    .expect("ring supports TLS 1.2 and 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}
