//! Steps cannot reach what the cluster keeps them from: `http` steps never connect to cloud
//! metadata or the API itself (not even through a redirect), and `publish` steps stay inside
//! the worker's publish allow-list.

use std::time::Duration;

use drover_tests::{Recorder, TestEnv};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{deploy, get, start, wait_settled};

/// One `http` GET of `url`, retried up to 3 times if it ever failed retryably.
fn calling(name: &str, url: &str) -> String {
    format!(
        r#"
name: {name}
steps:
  - id: call
    kind: http
    method: GET
    url: "{url}"
    timeout: 5s
    retry: {{ max_attempts: 3, backoff: 10ms }}
    next: [{{ to: done }}]
  - id: done
    kind: end
    status: completed
"#
    )
}

async fn instance(api: &str, id: &str) -> anyhow::Result<Value> {
    let (status, body) = get(&format!("{api}/v1/instances/{id}")).await?;
    anyhow::ensure!(status == 200, "instance {id}: {status} {body}");
    Ok(body)
}

/// Attempts of the `call` step in the instance's journal.
async fn call_attempts(api: &str, id: &str) -> anyhow::Result<Vec<Value>> {
    let (_, journal) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
    Ok(journal["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["step_id"] == "call" && e["outcome"] != "started")
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_steps_refuse_cloud_metadata_and_the_api_itself_but_reach_allowed_hosts()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let recorder_url = recorder.start().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    let api_addr = api.trim_start_matches("http://").to_owned();

    let cases = [
        // (workflow, url, expected error; None: completes)
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            Some(
                r#"http step "call": 169.254.169.254 is denied by the egress policy (169.254.0.0/16)"#
                    .to_owned(),
            ),
        ),
        (
            "itself",
            format!("{api}/v1/workflows"),
            Some(format!(
                r#"http step "call": {api_addr} is denied by the egress policy (the api's own address {api_addr})"#
            )),
        ),
        (
            "itself-by-name",
            format!("{}/v1/workflows", api.replace("127.0.0.1", "localhost")),
            Some("is denied by the egress policy (the api's own address".to_owned()),
        ),
        (
            "redirected",
            format!("{recorder_url}/redirect/x?to={api}/v1/workflows"),
            Some(format!(
                "{api_addr} is denied by the egress policy (the api's own address {api_addr})"
            )),
        ),
        ("allowed", format!("{recorder_url}/ok/direct"), None),
        (
            "allowed-redirect",
            format!("{recorder_url}/redirect/y?to={recorder_url}/ok/after"),
            None,
        ),
    ];
    let mut started = vec![];
    for (name, url, expected) in &cases {
        deploy(api, &calling(name, url)).await?;
        let ids = start(api, name, json!({}), 1).await?;
        started.push((ids[0].clone(), name, expected));
    }
    wait_settled(&env, cases.len() as i64, Duration::from_secs(30)).await?;

    for (id, name, expected) in started {
        let instance = instance(api, &id).await?;
        let attempts = call_attempts(api, &id).await?;
        match expected {
            Some(expected) => {
                assert_eq!(instance["state"], "in_error", "{name}: {instance}");
                let error = instance["error"].as_str().unwrap_or_default();
                assert!(error.contains(expected.as_str()), "{name}: {error}");
                assert_eq!(attempts.len(), 1, "{name}: refused once, never retried");
            }
            None => assert_eq!(instance["state"], "completed", "{name}: {instance}"),
        }
    }
    // The redirects were answered by the recorder; only the allowed hops reached it again.
    let mut paths: Vec<String> = recorder.requests().into_iter().map(|r| r.path).collect();
    paths.sort();
    assert_eq!(
        paths,
        ["/ok/after", "/ok/direct", "/redirect/x", "/redirect/y"]
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_steps_outside_the_workers_allow_list_fail_when_they_run() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // The api deploys with no allow-list; the worker has one, as after a configuration change.
    let api_node = env.spawn_node("api").await?;
    let _worker = env
        .spawn_node_with("worker", &["--publish-allow", "orders.>"])
        .await?;
    let api = api_node.api();
    let inside = format!("orders.{}.new", env.prefix);
    let outside = format!("crm.{}.lead", env.prefix);
    let client = async_nats::connect(&env.nats_url).await?;
    let mut received = client.subscribe(format!("*.{}.*", env.prefix)).await?;
    for (name, subject) in [("inside", &inside), ("outside", &outside)] {
        deploy(
            api,
            &format!(
                r#"
name: {name}
steps:
  - id: send
    kind: publish
    subject: "{subject}"
    payload: {{ id: "instance.id" }}
    next: [{{ to: done }}]
  - id: done
    kind: end
    status: completed
"#
            ),
        )
        .await?;
    }
    let inside_id = start(api, "inside", json!({}), 1).await?.remove(0);
    let outside_id = start(api, "outside", json!({}), 1).await?.remove(0);
    wait_settled(&env, 2, Duration::from_secs(30)).await?;

    assert_eq!(instance(api, &inside_id).await?["state"], "completed");
    let refused = instance(api, &outside_id).await?;
    assert_eq!(refused["state"], "in_error", "{refused}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "{outside:?} is not in the cluster's publish allow-list (orders.>)"
        )),
        "{error}"
    );
    // The allowed subject reached its subscriber.
    let message = tokio::time::timeout(Duration::from_secs(5), received.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the subscription ended"))?;
    assert_eq!(message.subject.as_str(), inside);
    env.cleanup().await;
    Ok(())
}
