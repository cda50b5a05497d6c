//! The web console (`/ui/`): the login form and its cookie, the same-origin check on actions,
//! scopes, confirmation, and pages that show what the JSON API shows.

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use drover_core::{InstanceState, Scope};
use drover_store::NewToken;
use tower::ServiceExt;

use super::TestEnv;
use super::lifecycle::{deploy_all, fake_node, instance, one, with_child};
use crate::Secret;

/// Which site a request claims to come from.
#[derive(Clone, Copy)]
enum Site {
    /// `Sec-Fetch-Site: same-origin`, as a browser sends for this site's forms.
    SameOrigin,
    /// `Sec-Fetch-Site: cross-site`.
    Foreign,
    /// Only `Origin`, of another site (a browser without `Sec-Fetch-Site`).
    OtherOrigin,
    /// Neither header.
    Nowhere,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn ui(
    env: &TestEnv,
    method: Method,
    uri: &str,
    cookie: Option<&str>,
    from: Site,
    form: &str,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "console.test");
    if let Some(token) = cookie {
        request = request.header(header::COOKIE, format!("drover_token={token}"));
    }
    request = match from {
        Site::SameOrigin => request.header("sec-fetch-site", "same-origin"),
        Site::Foreign => request
            .header("sec-fetch-site", "cross-site")
            .header(header::ORIGIN, "http://evil.test"),
        Site::OtherOrigin => request.header(header::ORIGIN, "http://evil.test"),
        Site::Nowhere => request,
    };
    if !form.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let response = env
        .router
        .clone()
        .oneshot(
            request
                .body(Body::from(form.to_owned()))
                .expect("test requests are well-formed"),
        )
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("response bodies are readable");
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn location(answer: &Answer) -> &str {
    answer
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

async fn viewer(env: &TestEnv) -> String {
    let token = Secret::generate().expect("randomness");
    env.state
        .store
        .create_token(&NewToken {
            name: "vic".to_owned(),
            scope: Scope::Viewer,
            hash: token.hash(),
            expires_at: None,
            actor: "test".to_owned(),
        })
        .await
        .expect("creates a token");
    token.expose().to_owned()
}

#[tokio::test]
async fn the_console_logs_in_with_an_api_token_kept_in_a_strict_http_only_cookie() {
    let env = TestEnv::new().await;
    // Not logged in: a page sends to the login form, remembering where it was going.
    let answer = ui(
        &env,
        Method::GET,
        "/ui/instances?state=ready",
        None,
        Site::SameOrigin,
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&answer), "/ui/?next=/ui/instances%3Fstate%3Dready");
    let answer = ui(&env, Method::GET, "/ui/", None, Site::SameOrigin, "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer
            .body
            .contains(r#"<label for="token">API token</label>"#),
        "{}",
        answer.body
    );

    // A wrong token is refused with the API's reason; no cookie is set.
    let answer = ui(
        &env,
        Method::POST,
        "/ui/login",
        None,
        Site::SameOrigin,
        "token=drv_nope",
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(
        answer.body.contains("unknown or revoked token"),
        "{}",
        answer.body
    );
    assert!(answer.headers.get(header::SET_COOKIE).is_none());

    // The right one is kept in the cookie, and the form goes where it was asked to (only to a
    // console page).
    let form = format!("token={}&next=%2Fui%2Fcampaigns", env.token);
    let answer = ui(
        &env,
        Method::POST,
        "/ui/login",
        None,
        Site::SameOrigin,
        &form,
    )
    .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    assert_eq!(location(&answer), "/ui/campaigns");
    let cookie = answer.headers[header::SET_COOKIE].to_str().expect("ascii");
    assert!(
        cookie.starts_with(&format!("drover_token={};", env.token)),
        "{cookie}"
    );
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let form = format!("token={}&next=https%3A%2F%2Fevil.test%2F", env.token);
    let answer = ui(
        &env,
        Method::POST,
        "/ui/login",
        None,
        Site::SameOrigin,
        &form,
    )
    .await;
    assert_eq!(location(&answer), "/ui/instances", "no open redirect");

    // With the cookie, pages render; logging out clears it.
    let token = env.token.clone();
    for page in [
        "/ui/instances",
        "/ui/campaigns",
        "/ui/workflows",
        "/ui/schedules",
        "/ui/nodes",
    ] {
        let answer = ui(&env, Method::GET, page, Some(&token), Site::SameOrigin, "").await;
        assert_eq!(answer.status, StatusCode::OK, "{page}: {}", answer.body);
        assert!(answer.body.contains("Log out"), "{page}");
    }
    let answer = ui(
        &env,
        Method::POST,
        "/ui/logout",
        Some(&token),
        Site::SameOrigin,
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert!(
        answer.headers[header::SET_COOKIE]
            .to_str()
            .expect("ascii")
            .contains("Max-Age=0")
    );
    env.cleanup().await;
}

#[tokio::test]
async fn console_actions_from_another_site_are_refused() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let id = one(&env, "steps").await;
    let token = env.token.clone();
    let uri = format!("/ui/instances/{id}/action");
    for from in [Site::Foreign, Site::OtherOrigin, Site::Nowhere] {
        let answer = ui(
            &env,
            Method::POST,
            &uri,
            Some(&token),
            from,
            "action=pause&confirmed=1",
        )
        .await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
        assert!(
            answer.body.contains("cross-site request refused"),
            "{}",
            answer.body
        );
        // Logging in from another site (login CSRF) is refused too.
        let form = format!("token={token}");
        let answer = ui(&env, Method::POST, "/ui/login", None, from, &form).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert!(answer.headers.get(header::SET_COOKIE).is_none());
    }
    assert_eq!(
        instance(&env, id).await.state,
        InstanceState::Ready,
        "nothing happened"
    );

    // From this site's page it acts, once confirmed.
    let answer = ui(
        &env,
        Method::POST,
        &uri,
        Some(&token),
        Site::SameOrigin,
        "action=pause",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.body.contains("Really"),
        "a confirmation page: {}",
        answer.body
    );
    assert_eq!(instance(&env, id).await.state, InstanceState::Ready);
    let answer = ui(
        &env,
        Method::POST,
        &uri,
        Some(&token),
        Site::SameOrigin,
        "action=pause&confirmed=1",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(answer.body.contains(r#"id="result""#), "{}", answer.body);
    assert_eq!(instance(&env, id).await.state, InstanceState::Paused);
    env.cleanup().await;
}

#[tokio::test]
async fn a_viewer_may_look_but_not_act_and_pages_show_what_the_api_shows() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let node = fake_node(&env).await;
    let parent = one(&env, "parent").await;
    let child = with_child(&env, node, parent).await;
    let token = viewer(&env).await;

    let answer = ui(
        &env,
        Method::GET,
        &format!("/ui/instances/{parent}"),
        Some(&token),
        Site::SameOrigin,
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(
        answer.body.contains(&format!("/ui/instances/{child}")),
        "its child is linked"
    );
    assert!(answer.body.contains("Journal") && answer.body.contains("call"));
    assert!(
        !answer.body.contains("/action"),
        "a viewer sees no action buttons"
    );
    let answer = ui(
        &env,
        Method::GET,
        &format!("/ui/instances/{child}"),
        Some(&token),
        Site::SameOrigin,
        "",
    )
    .await;
    assert!(
        answer.body.contains(&format!("/ui/instances/{parent}")),
        "its parent is linked"
    );

    let answer = ui(
        &env,
        Method::POST,
        &format!("/ui/instances/{child}/action"),
        Some(&token),
        Site::SameOrigin,
        "action=kill&confirmed=1",
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    assert!(
        answer.body.contains("needs the operator scope"),
        "{}",
        answer.body
    );
    let answer = ui(
        &env,
        Method::POST,
        "/ui/campaigns/default/limit",
        Some(&token),
        Site::SameOrigin,
        "max_running=1&confirmed=1",
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);

    // A workflow's page draws its steps; an unknown instance is the API's 404.
    let answer = ui(
        &env,
        Method::GET,
        "/ui/workflows/parent",
        Some(&token),
        Site::SameOrigin,
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body.contains("<svg") && answer.body.contains("subworkflow"));
    let answer = ui(
        &env,
        Method::GET,
        "/ui/instances/not-an-id",
        Some(&token),
        Site::SameOrigin,
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(
        answer.body.contains("malformed instance id"),
        "{}",
        answer.body
    );
    env.cleanup().await;
}
