//! `drover token create|list|revoke`: API tokens. Needs an admin token.

use anyhow::Result;
use drover_api::{ApiClient, CreateToken};
use drover_core::Scope;
use serde_json::Value;

use super::{View, list, text, time};

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it. It is shown this once: store it somewhere safe.
    Create {
        /// The token's name (a slug): the actor of everything done with it.
        name: String,
        /// What it may do: `viewer` reads; `operator` also starts instances, runs lifecycle
        /// commands, resumes, sends events and sets campaign limits; `admin` also deploys
        /// workflows, creates campaigns and manages tokens.
        #[arg(long)]
        scope: Scope,
        /// How long it is valid, e.g. `90d` or `12h`; it never expires when absent.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (names, scopes, expiry; never the tokens).
    List,
    /// Revoke a token: every request with it is refused from now on (on every API node within
    /// 5 s).
    Revoke {
        /// The token's name.
        name: String,
    },
}

pub(super) async fn run(client: &ApiClient, command: TokenCommand) -> Result<(Value, View)> {
    Ok(match command {
        TokenCommand::Create {
            name,
            scope,
            expires,
        } => {
            let request = CreateToken {
                name,
                scope,
                expires_in: expires,
            };
            (client.create_token(&request).await?, View::TokenCreated)
        }
        TokenCommand::List => (client.tokens().await?, View::Tokens),
        TokenCommand::Revoke { name } => (client.revoke_token(&name).await?, View::TokenRevoked),
    })
}

/// The token alone on standard output (so `TOKEN=$(drover token create …)` works); what it
/// is goes to standard error.
pub(super) fn render_created(answer: &Value) -> String {
    let expires = match answer["expires_at"].as_str() {
        Some(_) => format!("expires {}", time(&answer["expires_at"])),
        None => "never expires".to_owned(),
    };
    eprintln!(
        "token {} ({}, {expires}); it is shown once:",
        text(&answer["name"]),
        text(&answer["scope"]),
    );
    format!("{}\n", text(&answer["token"]))
}

pub(super) fn render_list(answer: &Value) -> String {
    list(
        &answer["tokens"],
        "no tokens (the nodes' bootstrap admin token is not listed)",
        &["NAME", "SCOPE", "STATUS", "CREATED", "BY", "EXPIRES"],
        |t| {
            vec![
                text(&t["name"]),
                text(&t["scope"]),
                text(&t["status"]),
                time(&t["created_at"]),
                text(&t["created_by"]),
                if t["expires_at"].is_null() {
                    "never".to_owned()
                } else {
                    time(&t["expires_at"])
                },
            ]
        },
    )
}

pub(super) fn render_revoked(answer: &Value) -> String {
    format!(
        "token {} revoked at {}\n",
        text(&answer["name"]),
        time(&answer["revoked_at"])
    )
}
