//! The one way a long operation (bake, boot, deploy) learns it should stop and clean up.

/// Resolves on Ctrl-C or SIGTERM, with the reason for messages. Without a SIGTERM handler (it
/// could not be installed) only Ctrl-C counts.
pub async fn interrupted() -> &'static str {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted (Ctrl-C)";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted (Ctrl-C)",
        _ = term.recv() => "interrupted (SIGTERM)",
    }
}
