//! Postgres over TLS: the `sslmode` and `sslrootcert` of `DATABASE_URL` are honoured
//! (sqlx with rustls, webpki roots). These tests need a server with `ssl = on` (Debian's and
//! the official images' packages ship it with a self-signed "snakeoil" certificate); on a
//! server without TLS they say so and check nothing.

use drover_store::{Store, StoreConfig};

fn database_url() -> String {
    std::env::var("DATABASE_URL").expect("set DATABASE_URL to the Postgres server to test")
}

/// `DATABASE_URL` with `params` appended (later parameters win over earlier ones).
fn with_params(params: &str) -> String {
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

async fn connect(url: String) -> drover_store::Result<Store> {
    Store::connect(&StoreConfig {
        url,
        max_connections: 1,
    })
    .await
}

/// The server's certificate file, when the server speaks TLS; `None` (and a note) when not.
async fn server_tls() -> Option<String> {
    let store = connect(with_params("sslmode=disable"))
        .await
        .expect("DATABASE_URL is reachable without TLS");
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(store.pool())
        .await
        .expect("SHOW ssl");
    if ssl != "on" {
        eprintln!("the Postgres server at DATABASE_URL has ssl = off: TLS not tested");
        return None;
    }
    sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(store.pool())
        .await
        .ok()
}

/// Is this connection's own backend encrypted, and with which protocol?
async fn own_backend_tls(store: &Store) -> (bool, Option<String>) {
    sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_ssl has a row for every backend")
}

#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    if server_tls().await.is_none() {
        return;
    }
    let store = connect(with_params("sslmode=require"))
        .await
        .expect("sslmode=require connects to a server with ssl = on");
    let (ssl, version) = own_backend_tls(&store).await;
    assert!(
        ssl,
        "the backend of an sslmode=require connection is encrypted"
    );
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
        "{version:?}"
    );
    let plain = connect(with_params("sslmode=disable"))
        .await
        .expect("plain");
    assert!(!own_backend_tls(&plain).await.0, "the check can tell");
}

#[tokio::test]
async fn sslmode_verify_full_refuses_a_certificate_no_trusted_root_signed() {
    if server_tls().await.is_none() {
        return;
    }
    // A self-signed test certificate is not signed by any of the webpki roots.
    let refused = connect(with_params("sslmode=verify-full"))
        .await
        .err()
        .map(|err| err.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("certificate")),
        "verify-full must refuse an unknown certificate: {refused:?}"
    );
}

/// `sslrootcert` adds a root: a server with a self-signed certificate for `localhost` (the
/// snakeoil one) verifies with `verify-full` when that certificate is the root. (`verify-ca`
/// with a name the certificate does not carry fails in sqlx 0.8.6 with rustls ≥ 0.23.24,
/// sqlx issue #3793, fixed in sqlx 0.9.)
#[tokio::test]
async fn sslrootcert_adds_the_root_verify_full_trusts() {
    let Some(cert_file) = server_tls().await else {
        return;
    };
    if std::fs::metadata(&cert_file).is_err() {
        eprintln!("the server's certificate {cert_file} is not readable here: not tested");
        return;
    }
    let url = with_params(&format!("sslmode=verify-full&sslrootcert={cert_file}"));
    let Some(url) = ["@127.0.0.1:", "//127.0.0.1:", "@localhost:", "//localhost:"]
        .iter()
        .find(|host| url.contains(*host))
        .map(|host| url.replacen(host, &host.replace("127.0.0.1", "localhost"), 1))
    else {
        eprintln!("DATABASE_URL is not a local server: sslrootcert not tested");
        return;
    };
    let store = connect(url).await.unwrap_or_else(|err| {
        panic!("verify-full trusts the server certificate {cert_file} named by sslrootcert (is it for `localhost`?): {err}")
    });
    assert!(own_backend_tls(&store).await.0);
}
