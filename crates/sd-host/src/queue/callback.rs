//! Result callbacks: POST JSON to the task's `callback_url` after its images are stored, retrying
//! 5xx answers, timeouts and connection errors with exponential backoff. Private targets are
//! refused (checked again at delivery, after DNS) and redirects are not followed.

use std::time::Duration;

use crate::net;

/// Delivers `payload`; returns the number of attempts made, or the last error.
pub async fn deliver(
    url: &str,
    payload: &serde_json::Value,
    retries: u32,
    policy: &crate::config::NetworkConfig,
    first_backoff: Duration,
) -> Result<u32, String> {
    let parsed = net::check_url_syntax(url, policy).map_err(|e| e.to_string())?;
    let mut backoff = first_backoff;
    let mut last_err = String::new();
    // `retries` counts the attempts after the first.
    let attempts = retries + 1;
    for attempt in 1..=attempts {
        match net::pinned_client(&parsed, policy, Duration::from_secs(10)).await {
            Ok(client) => match client.post(parsed.clone()).json(payload).send().await {
                Ok(r) if r.status().is_success() => return Ok(attempt),
                Ok(r) if r.status().is_server_error() => {
                    last_err = format!("callback answered {}", r.status());
                }
                Ok(r) => return Err(format!("callback answered {} (not retried)", r.status())),
                Err(e) => last_err = format!("callback failed: {e}"),
            },
            // A target that resolves to a private address stays refused; DNS hiccups are retried.
            Err(e @ net::UrlPolicyError::Resolve(_)) => last_err = e.to_string(),
            Err(e) => return Err(e.to_string()),
        }
        if attempt < attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
    Err(last_err)
}
