//! The NATS logins other than a password, against a private nats-server: TLS with a client
//! certificate (a throwaway CA made here) and an NKey seed file. Each logs a node in and runs
//! a workflow, and what the server must refuse is refused with an error that says why.

use std::time::Duration;

use anyhow::Context;
use drover_bus::permissions::AuthorizationConfig;
use drover_tests::{NatsServer, ServerOptions, ServerTls, TestEnv};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::support::{deploy, start, wait_settled};

/// Long enough for a refused node to start, fail and exit; well under
/// [`drover_bus::CONNECT_WAIT`]: a refusal is not taken for a server that does not answer.
const REFUSED_WITHIN: Duration = Duration::from_secs(10);

fn auth_config() -> AuthorizationConfig {
    AuthorizationConfig {
        prefix: format!("t{}", uuid::Uuid::now_v7().simple()),
        ..Default::default()
    }
}

/// A certificate authority: its certificate's PEM and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate (PEM) and its key (PEM) for `names`, to use as `purpose` says.
    fn sign(
        &self,
        name: &str,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A server certificate for 127.0.0.1 and localhost and a client certificate, both of `ca`.
fn server_tls(ca: &Ca) -> anyhow::Result<ServerTls> {
    let (cert, key) = ca.sign(
        "nats-server",
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) =
        ca.sign("drover-node", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(ServerTls {
        ca: ca.pem.clone(),
        cert,
        key,
        client_cert,
        client_key,
    })
}

/// `VAR`'s value in `env` replaced (or added).
fn with_var(mut env: Vec<(String, String)>, var: &str, value: String) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != var);
    env.push((var.to_owned(), value));
    env
}

fn without_vars(mut env: Vec<(String, String)>, vars: &[&str]) -> Vec<(String, String)> {
    env.retain(|(k, _)| !vars.contains(&k.as_str()));
    env
}

/// Deploys a two-step workflow through `api`, starts `count` instances and waits for every
/// one to complete: jobs and their results went over the node's NATS connection.
async fn run_a_workflow(env: &TestEnv, api: &str, count: u32) -> anyhow::Result<()> {
    deploy(
        api,
        "name: login\nsteps:\n  - { id: a, kind: assign, set: { v: '1 + 1' }, next: [{ to: b }] }\n  - { id: b, kind: end, status: completed }\n",
    )
    .await?;
    let ids = start(api, "login", json!({}), count).await?;
    assert_eq!(ids.len(), count as usize);
    let states = wait_settled(env, i64::from(count), Duration::from_secs(30)).await?;
    assert_eq!(states, vec![("completed".to_owned(), i64::from(count))]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_client_certificate_runs_a_workflow_over_tls() -> anyhow::Result<()> {
    let ca = Ca::new("drover test CA")?;
    let options = ServerOptions {
        tls: Some(server_tls(&ca)?),
        ..Default::default()
    };
    let server = NatsServer::start_with(&auth_config(), &options).await?;
    let env = TestEnv::with_nats(&server).await?;
    let mut node_env = server.node_env("node")?;
    node_env.extend(server.tls_env());
    assert!(
        node_env.iter().any(|(k, _)| k == "NATS_TLS_CERT"),
        "{node_env:?}"
    );

    let node = env
        .spawn_node_env("api,worker,coordinator", &[], &node_env)
        .await?;
    run_a_workflow(&env, node.api(), 3).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_client_certificate_or_trusting_another_ca_is_refused()
-> anyhow::Result<()> {
    let ca = Ca::new("drover test CA")?;
    let options = ServerOptions {
        tls: Some(server_tls(&ca)?),
        ..Default::default()
    };
    let server = NatsServer::start_with(&auth_config(), &options).await?;
    let env = TestEnv::with_nats(&server).await?;
    let mut good = server.node_env("worker")?;
    good.extend(server.tls_env());

    // No client certificate: the server ends the handshake.
    let no_cert = without_vars(good.clone(), &["NATS_TLS_CERT", "NATS_TLS_KEY"]);
    let (status, log) = env.node_refused("worker", &no_cert, REFUSED_WITHIN).await?;
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(
        log.contains("error: connecting to NATS") && log.contains("CertificateRequired"),
        "log:\n{log}"
    );

    // A CA that did not sign the server's certificate: the node does not trust the server.
    let other = Ca::new("another CA")?;
    let other_ca = server.dir().join("other-ca.pem");
    std::fs::write(&other_ca, &other.pem)?;
    let wrong_ca = with_var(good, "NATS_TLS_CA", other_ca.display().to_string());
    let (status, log) = env
        .node_refused("worker", &wrong_ca, REFUSED_WITHIN)
        .await?;
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(
        log.contains("error: connecting to NATS")
            && log.contains("invalid peer certificate: UnknownIssuer"),
        "log:\n{log}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_logs_in_with_an_nkey_seed_file_and_an_unknown_key_is_refused() -> anyhow::Result<()>
{
    let user = nkeys::KeyPair::new_user();
    let options = ServerOptions {
        nkeys: vec![user.public_key()],
        ..Default::default()
    };
    let server = NatsServer::start_with(&auth_config(), &options).await?;
    let env = TestEnv::with_nats(&server).await?;
    let seed_file = server.dir().join("node.nk");
    std::fs::write(
        &seed_file,
        user.seed().context("a generated pair has a seed")?,
    )?;
    let node_env = vec![(
        "NATS_NKEY_SEED_FILE".to_owned(),
        seed_file.display().to_string(),
    )];

    let node = env
        .spawn_node_env("api,worker,coordinator", &[], &node_env)
        .await?;
    run_a_workflow(&env, node.api(), 3).await?;

    // A key the server does not know.
    let stranger = server.dir().join("stranger.nk");
    std::fs::write(
        &stranger,
        nkeys::KeyPair::new_user()
            .seed()
            .context("a generated pair has a seed")?,
    )?;
    let stranger_env = vec![(
        "NATS_NKEY_SEED_FILE".to_owned(),
        stranger.display().to_string(),
    )];
    let (status, log) = env
        .node_refused("worker", &stranger_env, REFUSED_WITHIN)
        .await?;
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(
        log.contains("error: connecting to NATS") && log.contains("authorization violation"),
        "log:\n{log}"
    );
    env.cleanup().await;
    Ok(())
}
