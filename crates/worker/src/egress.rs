//! Where `http` steps may connect: a cluster-wide deny list (cloud metadata and the API's own
//! address by default) and an optional allow-list.
//!
//! The policy is enforced on the addresses actually connected to, so a name that resolves to
//! a denied address is refused whenever it resolves there (DNS rebinding gains nothing):
//! - names go through [`CheckedResolver`], a `reqwest` resolver that drops denied addresses
//!   (and refuses the name when none is left);
//! - IP-literal URLs, which `reqwest` never resolves, are checked before the request;
//! - redirects are not followed by `reqwest`: the step follows them itself, each hop checked
//!   like the first (see `step::http_call`).
//!
//! A rule may name a port (`10.0.0.5:8080`, `[fd00::1]:443`, `api.internal:8080`), and so does
//! the API's own address. A resolver sees a name but not the port, so each destination port
//! has its own client whose resolver checks that port ([`Egress::client_for`]).
//! System proxies are not used: a proxy would connect on the step's behalf, out of sight.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The deny list when none is configured: link-local (169.254.169.254, the metadata service
/// of AWS, Azure, GCP, Oracle…; `fe80::/10`), AWS's IPv6 metadata address, Alibaba's
/// metadata address and GCP's metadata host name.
pub const DEFAULT_HTTP_DENY: &str =
    "169.254.0.0/16,fe80::/10,fd00:ec2::254,100.100.100.200,metadata.google.internal";

/// One destination rule: an address or CIDR block, a host name (`*.example.com`: its
/// subdomains), optionally with a port (`host:port`, `[v6]:port`); without a port, every port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRule {
    target: Target,
    port: Option<u16>,
    /// How the rule is named in errors.
    label: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Net(IpNet),
    /// Lowercase, without a trailing dot.
    Host(String),
    /// Strict subdomains of this (lowercase) name.
    Subdomains(String),
    /// A listening socket bound to this address: the address itself, the unspecified
    /// address (which reaches the local host), every loopback address when bound to one
    /// (`localhost` may resolve to either family), and when bound to the unspecified
    /// address, every address of this machine.
    Listener(IpAddr),
}

/// Why a destination is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{destination} is denied by the egress policy ({rule})")]
    Denied { destination: String, rule: String },
    #[error("{destination} is not in the egress allow-list ({allow})")]
    NotAllowed { destination: String, allow: String },
}

impl EgressRule {
    /// The rule refusing a socket this node listens on (the API): `0.0.0.0`/`::` mean every
    /// address of this machine on that port.
    pub fn listener(addr: SocketAddr, what: &str) -> Self {
        Self {
            target: Target::Listener(canonical(addr.ip())),
            port: Some(addr.port()),
            label: format!("{what} {addr}"),
        }
    }

    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    fn matches_name(&self, name: &str, port: u16) -> bool {
        self.port_matches(port)
            && match &self.target {
                Target::Host(host) => host == name,
                Target::Subdomains(parent) => name
                    .strip_suffix(parent.as_str())
                    .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
                Target::Net(_) | Target::Listener(_) => false,
            }
    }

    /// `ip` is canonical (see [`canonical`]).
    fn matches_ip(&self, ip: IpAddr, port: u16) -> bool {
        self.port_matches(port)
            && match &self.target {
                Target::Net(net) => net.contains(&ip),
                Target::Listener(bound) => {
                    ip == *bound
                        || ip.is_unspecified()
                        || (bound.is_loopback() && ip.is_loopback())
                        || (bound.is_unspecified() && is_local(ip))
                }
                Target::Host(_) | Target::Subdomains(_) => false,
            }
    }
}

impl FromStr for EgressRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let invalid = |why: &str| format!("egress rule {text:?}: {why}");
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| invalid("`[` without `]`"))?;
            match after {
                "" => (inner, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (inner, Some(port)),
                    None => return Err(invalid("expected `:port` after `]`")),
                },
            }
        } else if text.parse::<IpNet>().is_ok() || text.parse::<IpAddr>().is_ok() {
            (text, None)
        } else if text.matches(':').count() > 1 {
            return Err(invalid(
                "not an address or CIDR (an IPv6 address with a port is written [addr]:port)",
            ));
        } else {
            match text.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let port = port
            .map(|p| match p.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(invalid("the port must be 1 to 65535")),
            })
            .transpose()?;
        let target = if let Ok(net) = host.parse::<IpNet>() {
            Target::Net(net)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Target::Net(IpNet::from(canonical(ip)))
        } else {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            let (wildcard, bare) = match name.strip_prefix("*.") {
                Some(bare) => (true, bare.to_owned()),
                None => (false, name),
            };
            let valid = !bare.is_empty()
                && bare.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                });
            if !valid {
                return Err(invalid(
                    "expected an IP address, a CIDR block or a host name (`*.name`: its subdomains)",
                ));
            }
            if wildcard {
                Target::Subdomains(bare)
            } else {
                Target::Host(bare)
            }
        };
        Ok(Self {
            target,
            port,
            label: text.to_owned(),
        })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// Comma-separated [`EgressRule`]s; blank entries are ignored (so `""` is an empty list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules(pub Vec<EgressRule>);

impl FromStr for EgressRules {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        drover_core::list::parse_comma_list(text).map(Self)
    }
}

impl fmt::Display for EgressRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        drover_core::list::write_comma_list(f, &self.0)
    }
}

/// Where `http` steps may connect. A destination is refused when a `deny` rule matches it;
/// otherwise, when `allow` is set and not empty, it must match an `allow` rule (a host-name
/// rule matches the name in the URL, an address rule the address connected to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    pub deny: Vec<EgressRule>,
    pub allow: Option<Vec<EgressRule>>,
}

impl Default for EgressPolicy {
    /// [`DEFAULT_HTTP_DENY`], no allow-list.
    fn default() -> Self {
        let deny = DEFAULT_HTTP_DENY
            .parse::<EgressRules>()
            .expect("invariant: the default deny list parses")
            .0;
        Self { deny, allow: None }
    }
}

impl EgressPolicy {
    /// The checks that need only the name (before it is resolved): denied names.
    pub fn check_name(&self, name: &str, port: u16) -> Result<(), Refusal> {
        let name = normal_name(name);
        match self.deny.iter().find(|rule| rule.matches_name(&name, port)) {
            Some(rule) => Err(Refusal::Denied {
                destination: name,
                rule: rule.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// May a step connect to `ip:port`, reached through the URL host `name` (`None`: the URL
    /// gave the address itself)?
    pub fn check_addr(&self, name: Option<&str>, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        let ip = canonical(ip);
        let name = name.map(normal_name);
        let destination = |with_port: bool| {
            let addr = match (ip, with_port) {
                (IpAddr::V6(v6), true) => format!("[{v6}]:{port}"),
                (ip, true) => format!("{ip}:{port}"),
                (ip, false) => ip.to_string(),
            };
            match &name {
                Some(name) => format!("{name} ({addr})"),
                None => addr,
            }
        };
        if let Some(rule) = self.deny.iter().find(|rule| {
            rule.matches_ip(ip, port) || name.as_ref().is_some_and(|n| rule.matches_name(n, port))
        }) {
            return Err(Refusal::Denied {
                destination: destination(rule.port.is_some()),
                rule: rule.to_string(),
            });
        }
        match &self.allow {
            Some(allow)
                if !allow.is_empty()
                    && !allow.iter().any(|rule| {
                        rule.matches_ip(ip, port)
                            || name.as_ref().is_some_and(|n| rule.matches_name(n, port))
                    }) =>
            {
                Err(Refusal::NotAllowed {
                    destination: destination(true),
                    allow: EgressRules(allow.clone()).to_string(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:169.254.169.254`) are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn normal_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Is `ip` an address of this machine? Loopback and unspecified addresses are; others are
/// looked up among the interfaces' addresses now (they change). If the interfaces cannot be
/// read, every address counts as local: the rule asking refuses rather than lets through.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || if_addrs::get_if_addrs().map_or(true, |interfaces| {
            interfaces
                .iter()
                .any(|interface| canonical(interface.ip()) == ip)
        })
}

/// A `reqwest` resolver that resolves names for one destination port and drops the
/// addresses the policy refuses; a name with none left fails with the [`Refusal`].
struct CheckedResolver {
    policy: Arc<EgressPolicy>,
    port: u16,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let port = self.port;
        let name = name.as_str().to_owned();
        Box::pin(async move {
            policy.check_name(&name, port)?;
            let resolved = tokio::net::lookup_host((name.as_str(), port)).await?;
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .filter(
                    |addr| match policy.check_addr(Some(&name), addr.ip(), port) {
                        Ok(()) => true,
                        Err(refused) => {
                            refusal.get_or_insert(refused);
                            false
                        }
                    },
                )
                .collect();
            match refusal {
                Some(refused) if allowed.is_empty() => Err(refused.into()),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// Why [`Egress::client_for`] gave no client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EgressError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Url(String),
    #[error("building the http client: {0}")]
    Client(String),
}

/// The policy and one HTTP client per destination port, each resolving through a
/// [`CheckedResolver`] for its port, never following redirects nor using a proxy.
pub(crate) struct Egress {
    policy: Arc<EgressPolicy>,
    clients: Mutex<HashMap<u16, reqwest::Client>>,
}

/// Past this many ports the client cache starts over (their idle connections close).
const MAX_CLIENTS: usize = 256;

impl Egress {
    pub(crate) fn new(policy: EgressPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `url`'s host (an address, or a name before it is resolved) and gives the
    /// client for its port, whose resolver checks the addresses the name resolves to.
    pub(crate) fn client_for(&self, url: &reqwest::Url) -> Result<reqwest::Client, EgressError> {
        let port = url
            .port_or_known_default()
            .ok_or_else(|| EgressError::Url(format!("{url}: not an http(s) URL")))?;
        let host = url
            .host_str()
            .ok_or_else(|| EgressError::Url(format!("{url}: no host")))?;
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(ip) => self.policy.check_addr(None, ip, port)?,
            Err(_) => self.policy.check_name(host, port)?,
        }
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| EgressError::Client("the client cache was poisoned".into()))?;
        if let Some(client) = clients.get(&port) {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver {
                policy: Arc::clone(&self.policy),
                port,
            }))
            .build()
            .map_err(|e| EgressError::Client(e.to_string()))?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(port, client.clone());
        Ok(client)
    }
}

/// The [`Refusal`] somewhere in `err`'s causes, if the policy refused the connection.
pub(crate) fn refusal_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return Some(refusal);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<EgressRule> {
        text.parse::<EgressRules>().expect("test rules parse").0
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn denied(policy: &EgressPolicy, addr: &str, port: u16) -> Option<String> {
        policy
            .check_addr(None, ip(addr), port)
            .err()
            .map(|e| e.to_string())
    }

    #[test]
    fn the_default_denies_cloud_metadata_everywhere() {
        let policy = EgressPolicy::default();
        assert_eq!(
            denied(&policy, "169.254.169.254", 80).as_deref(),
            Some("169.254.169.254 is denied by the egress policy (169.254.0.0/16)")
        );
        for addr in [
            "169.254.0.1",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
        ] {
            assert!(denied(&policy, addr, 443).is_some(), "{addr}");
        }
        for addr in [
            "127.0.0.1",
            "10.0.0.1",
            "93.184.216.34",
            "::1",
            "169.255.0.1",
        ] {
            assert_eq!(denied(&policy, addr, 443), None, "{addr}");
        }
        assert!(policy.check_name("Metadata.Google.Internal.", 80).is_err());
        assert!(policy.check_name("google.internal", 80).is_ok());
    }

    #[test]
    fn rules_parse_addresses_blocks_names_and_ports() {
        let parsed =
            rules("10.0.0.0/8, 10.1.2.3:8080,[::1]:9000,fd00::/8,api.internal:8443,*.corp,");
        assert_eq!(parsed.len(), 6);
        assert_eq!(parsed[1].port, Some(8080));
        assert_eq!(parsed[2].target, Target::Net(IpNet::from(ip("::1"))));
        assert_eq!(parsed[2].port, Some(9000));
        assert_eq!(parsed[4].target, Target::Host("api.internal".into()));
        assert_eq!(parsed[5].target, Target::Subdomains("corp".into()));
        assert_eq!(
            EgressRules(parsed).to_string(),
            "10.0.0.0/8,10.1.2.3:8080,[::1]:9000,fd00::/8,api.internal:8443,*.corp"
        );
        for bad in [
            "10.0.0.0/33",
            "host:0",
            "host:99999",
            "fe80::zz:80",
            "[::1",
            "[::1]x",
            "a b",
            "*.",
            "a..b",
            "http://x",
        ] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad:?}");
        }
        assert!("".parse::<EgressRules>().is_ok_and(|r| r.0.is_empty()));
    }

    #[test]
    fn port_rules_refuse_only_their_port() {
        let policy = EgressPolicy {
            deny: rules("10.1.2.3:8080,*.corp:22"),
            allow: None,
        };
        assert_eq!(
            denied(&policy, "10.1.2.3", 8080).as_deref(),
            Some("10.1.2.3:8080 is denied by the egress policy (10.1.2.3:8080)")
        );
        assert_eq!(denied(&policy, "10.1.2.3", 80), None);
        assert!(policy.check_name("git.corp", 22).is_err());
        assert!(policy.check_name("git.corp", 443).is_ok());
        assert!(policy.check_name("corp", 22).is_ok(), "subdomains only");
        assert!(policy.check_name("xcorp", 22).is_ok());
    }

    #[test]
    fn the_api_listener_is_refused_on_its_address_and_on_any_local_one_when_unspecified() {
        let bound = EgressPolicy {
            deny: vec![EgressRule::listener(
                "127.0.0.1:8080".parse().expect("addr"),
                "the api's own address",
            )],
            allow: None,
        };
        assert_eq!(
            denied(&bound, "127.0.0.1", 8080).as_deref(),
            Some(
                "127.0.0.1:8080 is denied by the egress policy (the api's own address 127.0.0.1:8080)"
            )
        );
        assert!(
            denied(&bound, "0.0.0.0", 8080).is_some(),
            "0.0.0.0 reaches the local host"
        );
        assert!(denied(&bound, "::ffff:127.0.0.1", 8080).is_some());
        assert!(
            denied(&bound, "::1", 8080).is_some(),
            "localhost may be ::1"
        );
        assert_eq!(denied(&bound, "127.0.0.1", 8081), None);
        assert_eq!(denied(&bound, "10.0.0.1", 8080), None);

        let any = EgressPolicy {
            deny: vec![EgressRule::listener(
                "[::]:8080".parse().expect("addr"),
                "the api",
            )],
            allow: None,
        };
        for addr in ["127.0.0.1", "127.0.0.9", "::1", "0.0.0.0"] {
            assert!(denied(&any, addr, 8080).is_some(), "{addr}");
        }
        let own = if_addrs::get_if_addrs()
            .expect("interfaces are readable")
            .into_iter()
            .map(|i| i.ip())
            .find(|ip| !ip.is_loopback());
        if let Some(own) = own {
            assert!(denied(&any, &own.to_string(), 8080).is_some(), "{own}");
        }
        assert_eq!(denied(&any, "93.184.216.34", 8080), None);
        assert_eq!(denied(&any, "127.0.0.1", 8081), None);
    }

    #[test]
    fn an_allow_list_admits_only_its_destinations_and_never_a_denied_one() {
        let policy = EgressPolicy {
            deny: rules("169.254.0.0/16,10.9.9.9"),
            allow: Some(rules("10.0.0.0/8,api.example.com:443")),
        };
        assert_eq!(denied(&policy, "10.1.1.1", 80), None);
        assert_eq!(
            denied(&policy, "192.168.1.1", 80).as_deref(),
            Some("192.168.1.1:80 is not in the egress allow-list (10.0.0.0/8,api.example.com:443)")
        );
        assert!(denied(&policy, "10.9.9.9", 80).is_some(), "deny wins");
        let via = |name: &str, addr: &str, port| policy.check_addr(Some(name), ip(addr), port);
        assert!(via("api.example.com", "93.184.216.34", 443).is_ok());
        assert!(via("API.example.com.", "93.184.216.34", 443).is_ok());
        assert!(via("api.example.com", "93.184.216.34", 80).is_err());
        assert!(via("other.example.com", "93.184.216.34", 443).is_err());
        assert!(
            via("api.example.com", "169.254.169.254", 443).is_err(),
            "deny wins"
        );
        let empty = EgressPolicy {
            deny: vec![],
            allow: Some(vec![]),
        };
        assert_eq!(
            denied(&empty, "192.168.1.1", 80),
            None,
            "an empty list is no list"
        );
    }

    /// A loopback server that counts the connections it accepts.
    async fn counting_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn names_resolving_to_a_denied_address_never_connect() {
        let (addr, accepted) = counting_server().await;
        // As an API bound to every address would be (`localhost` may resolve to ::1 too).
        let any = SocketAddr::from(([0, 0, 0, 0], addr.port()));
        let egress = Egress::new(EgressPolicy {
            deny: vec![EgressRule::listener(any, "the api's own address")],
            allow: None,
        });
        // `localhost` goes through the resolver, whose refusal ends the request.
        let url: reqwest::Url = format!("http://localhost:{}/", addr.port())
            .parse()
            .expect("url");
        let client = egress
            .client_for(&url)
            .expect("a name passes before it is resolved");
        let err = client.get(url).send().await.expect_err("refused");
        let refused = refusal_in(&err).unwrap_or_else(|| panic!("no refusal in {err:?}"));
        assert!(refused.to_string().starts_with("localhost ("), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("the api's own address 0.0.0.0:"),
            "{refused}"
        );
        // A literal address is checked before any request.
        let url: reqwest::Url = format!("http://{addr}/").parse().expect("url");
        match egress.client_for(&url) {
            Err(EgressError::Refused(Refusal::Denied { destination, .. })) => {
                assert_eq!(destination, addr.to_string());
            }
            other => panic!("{url}: {other:?}"),
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

        // Another port of the same host is fine, through its own client.
        let (other, accepted) = counting_server().await;
        let url: reqwest::Url = format!("http://localhost:{}/", other.port())
            .parse()
            .expect("url");
        let client = egress.client_for(&url).expect("allowed");
        let response = client.get(url).send().await.expect("allowed call");
        assert_eq!(response.status(), 200);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
