//! Outbound URL policy for callbacks and downloads: no loopback, private, link-local or otherwise
//! internal targets unless `network.allow_private_targets` is set or the host is listed in
//! `network.allowed_private_hosts`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::NetworkConfig;

/// Whether `u` may reach internal addresses: everything when allowed, else only listed hosts.
fn exempt(u: &reqwest::Url, policy: &NetworkConfig) -> bool {
    if policy.allow_private_targets {
        return true;
    }
    let Some(host) = u.host_str() else {
        return false;
    };
    let host = host.to_ascii_lowercase();
    let port = u.port_or_known_default();
    policy.allowed_private_hosts.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        if entry == host {
            return true;
        }
        match entry.rsplit_once(':') {
            Some((h, p)) => h == host && p.parse::<u16>().ok() == port,
            None => false,
        }
    })
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UrlPolicyError {
    #[error("invalid URL: {0}")]
    Invalid(String),
    #[error("only http and https URLs are allowed")]
    Scheme,
    #[error("URL targets a private, loopback or link-local address ({0}); set network.allow_private_targets or list the host in network.allowed_private_hosts to allow it")]
    Private(String),
    #[error("cannot resolve host {0}")]
    Resolve(String),
}

pub fn is_private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private_v4(v4);
            }
            let seg0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg0 & 0xfe00) == 0xfc00 // unique local
                || (seg0 & 0xffc0) == 0xfe80 // link-local
                || v6 == Ipv6Addr::UNSPECIFIED
        }
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || o[0] >= 240
}

/// Syntax and scheme check, plus a literal-IP / `localhost` check; no DNS (for validation at submit).
pub fn check_url_syntax(url: &str, policy: &NetworkConfig) -> Result<reqwest::Url, UrlPolicyError> {
    let u = reqwest::Url::parse(url).map_err(|e| UrlPolicyError::Invalid(e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(UrlPolicyError::Scheme);
    }
    let host = u
        .host()
        .ok_or_else(|| UrlPolicyError::Invalid("URL has no host".into()))?;
    if exempt(&u, policy) {
        return Ok(u);
    }
    let private = match host {
        url::Host::Ipv4(ip) => is_private_v4(ip),
        url::Host::Ipv6(ip) => is_private_ip(IpAddr::V6(ip)),
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
    };
    if private {
        return Err(UrlPolicyError::Private(host.to_string()));
    }
    Ok(u)
}

/// Full check right before connecting: every address the host resolves to must be public.
/// Returns the addresses so the caller can pin the connection to them (no DNS rebinding).
pub async fn resolve_checked(
    url: &reqwest::Url,
    policy: &NetworkConfig,
) -> Result<Vec<SocketAddr>, UrlPolicyError> {
    let host = url
        .host_str()
        .ok_or_else(|| UrlPolicyError::Invalid("URL has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|_| UrlPolicyError::Resolve(host.clone()))?
        .collect();
    if addrs.is_empty() {
        return Err(UrlPolicyError::Resolve(host));
    }
    if !exempt(url, policy) {
        if let Some(a) = addrs.iter().find(|a| is_private_ip(a.ip())) {
            return Err(UrlPolicyError::Private(a.ip().to_string()));
        }
    }
    Ok(addrs)
}

/// A client for one request to `url`: DNS pinned to the checked addresses, redirects not followed.
pub async fn pinned_client(
    url: &reqwest::Url,
    policy: &NetworkConfig,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, UrlPolicyError> {
    let addrs = resolve_checked(url, policy).await?;
    let host = url.host_str().unwrap_or_default().to_string();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would connect on our behalf to whatever the name resolves to there.
        .no_proxy()
        .timeout(timeout)
        .resolve_to_addrs(&host, &addrs)
        .build()
        .map_err(|e| UrlPolicyError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_private: bool) -> NetworkConfig {
        NetworkConfig {
            allow_private_targets: allow_private,
            ..Default::default()
        }
    }

    #[test]
    fn private_targets_refused_unless_allowed() {
        for bad in [
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://0.0.0.0/",
        ] {
            assert!(
                matches!(
                    check_url_syntax(bad, &policy(false)),
                    Err(UrlPolicyError::Private(_))
                ),
                "{bad}"
            );
            assert!(check_url_syntax(bad, &policy(true)).is_ok(), "{bad}");
        }
        assert!(check_url_syntax("https://example.com/cb", &policy(false)).is_ok());
        assert!(check_url_syntax("http://8.8.8.8/", &policy(false)).is_ok());
        assert_eq!(
            check_url_syntax("file:///etc/passwd", &policy(true)),
            Err(UrlPolicyError::Scheme)
        );
        assert!(matches!(
            check_url_syntax("not a url", &policy(true)),
            Err(UrlPolicyError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn resolution_checks_every_address() {
        let u = reqwest::Url::parse("http://localhost:1/").unwrap();
        assert!(matches!(
            resolve_checked(&u, &policy(false)).await,
            Err(UrlPolicyError::Private(_))
        ));
        assert!(resolve_checked(&u, &policy(true)).await.is_ok());
    }

    #[test]
    fn listed_private_hosts_are_exempt_and_nothing_else() {
        let p = NetworkConfig {
            allow_private_targets: false,
            allowed_private_hosts: vec!["nas.local".into(), "127.0.0.1:8123".into()],
        };
        assert!(check_url_syntax("http://127.0.0.1:8123/hook", &p).is_ok());
        assert!(check_url_syntax("http://NAS.local:9000/x", &p).is_ok());
        for bad in [
            "http://127.0.0.1:8124/hook",
            "http://127.0.0.1/hook",
            "http://10.0.0.2:8123/",
            "http://localhost:8123/",
        ] {
            assert!(
                matches!(check_url_syntax(bad, &p), Err(UrlPolicyError::Private(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_listed_host_resolves_to_private_addresses() {
        let p = NetworkConfig {
            allow_private_targets: false,
            allowed_private_hosts: vec!["localhost:1".into()],
        };
        let ok = reqwest::Url::parse("http://localhost:1/").unwrap();
        assert!(resolve_checked(&ok, &p).await.is_ok());
        let other_port = reqwest::Url::parse("http://localhost:2/").unwrap();
        assert!(matches!(
            resolve_checked(&other_port, &p).await,
            Err(UrlPolicyError::Private(_))
        ));
    }
}
