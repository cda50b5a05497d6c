//! How a connection proves who it is (user and password, token, NKey, `.creds` file) and
//! protects itself (TLS), and which servers it may reach. Plain data: the `drover` binary fills
//! it from flags and environment, [`BusConfig::connect_client`](crate::BusConfig::connect_client)
//! turns it into `async_nats::ConnectOptions`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use async_nats::ServerAddr;

use crate::{Error, Result};

/// A secret (a password, a token). Its `Debug` prints `***`, and it has no `Display`, so it
/// cannot reach a log by accident; [`Secret::expose`] hands it to the one place that needs it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself: only to hand it to the NATS client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Self(secret)
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// How a connection authenticates. One method at a time, as nats-server checks one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// Anonymous: only for a server without authorization (a developer's machine).
    #[default]
    None,
    /// A user of the server's `authorization { users: [...] }` block (what
    /// `drover nats-config` generates).
    UserPassword { user: String, password: Secret },
    /// A server-wide token (`authorization { token: ... }`).
    Token(Secret),
    /// A file holding an NKey seed (`SU…`); the seed signs the server's nonce and never leaves
    /// the process.
    NKeySeedFile(PathBuf),
    /// A decentralized-auth `.creds` file (user JWT + NKey seed).
    CredsFile(PathBuf),
}

/// TLS towards the server. Without any field set, TLS is used only if the server requires it
/// or a URL says `tls://`, and the server's certificate is checked against the system roots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file of the CA(s) that signed the server's certificate (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (`verify: true`); needs
    /// `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Refuse to talk to a server that does not offer TLS. If unsure: on in production.
    pub required: bool,
}

/// The servers of a `NATS_URL`: one URL, or several separated by commas
/// (`nats://a:4222,nats://b:4222`); the client connects to one and fails over to the others.
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<ServerAddr>().map_err(|err| {
                Error::Config(format!("NATS server URL {:?}: {err}", redact_url(url)))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if addrs.is_empty() {
        return Err(Error::Config(
            "no NATS server URL given (e.g. nats://127.0.0.1:4222, or several separated by commas)"
                .to_owned(),
        ));
    }
    Ok(addrs)
}

/// `urls` with any password in them (`nats://user:secret@host`) replaced by `***`, for logs
/// and `Debug`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let scheme_end = url.find("://").map_or(0, |i| i + 3);
            let rest = &url[scheme_end..];
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => {
                    let userinfo = &rest[..at];
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    let user = if userinfo.contains(':') {
                        format!("{user}:***")
                    } else {
                        // A lone userinfo is a token.
                        "***".to_owned()
                    };
                    format!("{}{user}{}", &url[..scheme_end], &rest[at..])
                }
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let auth = NatsAuth::UserPassword {
            user: "drover-worker".to_owned(),
            password: Secret::new("hunter2-hunter2"),
        };
        let shown = format!("{auth:?} {:?}", NatsAuth::Token(Secret::new("tok-123")));
        assert!(shown.contains("drover-worker"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-123"),
            "{shown}"
        );
        assert!(shown.contains("***"), "{shown}");
    }

    #[test]
    fn several_servers_separated_by_commas_are_accepted() {
        let addrs =
            server_addrs("nats://a:4222, nats://b:4223,tls://c:4224").expect("three valid URLs");
        let hosts: Vec<(String, u16)> = addrs
            .iter()
            .map(|a| (a.host().to_owned(), a.port()))
            .collect();
        assert_eq!(
            hosts,
            [("a".into(), 4222), ("b".into(), 4223), ("c".into(), 4224)]
        );
        assert!(addrs[2].tls_required());
        assert_eq!(
            server_addrs("127.0.0.1").expect("default port")[0].port(),
            4222
        );
        for bad in ["", " , ", "nats://a:notaport", "http://a:4222"] {
            assert!(server_addrs(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("nats://u:secret@a:4222,nats://b:4222"),
            "nats://u:***@a:4222,nats://b:4222"
        );
        assert_eq!(redact_url("nats://tok@a:4222"), "nats://***@a:4222");
        assert_eq!(redact_url("a:4222"), "a:4222");
        let err = server_addrs("nats://u:secret@a:nope").expect_err("a bad port");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;
    use crate::BusConfig;

    #[tokio::test]
    async fn half_a_client_certificate_or_a_missing_seed_file_is_a_clear_error() {
        let config = BusConfig {
            tls: TlsConfig {
                cert_file: Some("client.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = config
            .connect_options()
            .await
            .expect_err("a cert without a key");
        assert!(err.to_string().contains("key"), "{err}");

        let config = BusConfig {
            auth: NatsAuth::NKeySeedFile("/nonexistent/drover.nk".into()),
            ..Default::default()
        };
        let err = config.connect_options().await.expect_err("no seed file");
        assert!(err.to_string().contains("/nonexistent/drover.nk"), "{err}");

        let config = BusConfig {
            url: "nats://a:4222,nats://b:bad".to_owned(),
            ..Default::default()
        };
        let err = config.connect_client().await.expect_err("a bad port");
        assert!(err.to_string().contains("nats://b:bad"), "{err}");
    }

    #[test]
    fn a_bus_config_debug_shows_no_secret() {
        let config = BusConfig {
            url: "nats://u:pw-in-url@a:4222".to_owned(),
            auth: NatsAuth::Token(Secret::new("the-token")),
            ..Default::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("pw-in-url") && !shown.contains("the-token"),
            "{shown}"
        );
    }
}
