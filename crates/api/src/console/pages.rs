//! The console's pages. Every read and every action calls the handler its `/v1` twin runs,
//! so the console shows and does exactly what the JSON API does.

use axum::body::Bytes;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use drover_core::{Definition, InstanceState};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::html::{Nav, banner, duration, json, page, state_badge, time};
use super::{Session, authenticate, cookie_safe, graph, session_cookie};
use crate::ApiState;
use crate::campaigns::SetLimit;
use crate::dto::{Instance, InstanceList, JournalQuery, ListQuery, VersionQuery};
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery, Slug, unstorable};
use crate::lifecycle::LifecycleResult;
use crate::operator::{ResumeMode, ResumeRequest};
use crate::{diagnosis, lifecycle, operator, routes, schedules};

/// Instances per page of the listing.
const PAGE_SIZE: i64 = 50;
/// Children listed on an instance's page.
const CHILDREN_SHOWN: i64 = 50;

type Page = Result<Response, Response>;

/// An error as a page (the API's message, its status).
pub(crate) fn error_page(session: Option<&Session>, err: &ApiError) -> Response {
    let status = err.status();
    if status.is_server_error() {
        tracing::error!(status = status.as_u16(), code = err.code(), error = %err, "console request failed");
    } else {
        tracing::debug!(status = status.as_u16(), code = err.code(), error = %err, "console request rejected");
    }
    let body = html! {
        div.banner.err role="alert" {
            strong { (err.code()) } ": " (err.public_message())
        }
        p { a href="/ui/instances" { "Back to the instances" } }
    };
    let title = status.canonical_reason().unwrap_or("Error");
    (status, page(title, Nav::None, session, None, body)).into_response()
}

fn fail(session: &Session) -> impl Fn(ApiError) -> Response + '_ {
    move |err| error_page(Some(session), &err)
}

pub(crate) async fn not_found(uri: Uri) -> Response {
    error_page(
        None,
        &ApiError::not_found("not_found", format!("no console page at {}", uri.path())),
    )
}

// --- login ----------------------------------------------------------------------------------

#[derive(Deserialize)]
pub(crate) struct NextQuery {
    next: Option<String>,
}

/// `/ui/`: the login form, or (logged in) the instances.
pub(crate) async fn home(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<NextQuery>,
) -> Response {
    if authenticate(&state, &headers).await.is_ok() {
        return Redirect::to(&safe_next(query.next.as_deref())).into_response();
    }
    login_form(StatusCode::OK, query.next.as_deref(), None)
}

fn login_form(status: StatusCode, next: Option<&str>, error: Option<&str>) -> Response {
    let body = html! {
        @if let Some(error) = error {
            div.banner.err role="alert" #login-error { (error) }
        }
        form.login method="post" action="/ui/login" {
            p {
                label for="token" { "API token" }
                input #token type="password" name="token" required autocomplete="current-password"
                    aria-describedby="token-help" autofocus;
            }
            p.muted #token-help {
                "A token from " code { "drover token create" } ", or the nodes' admin token. "
                "It is kept in an HttpOnly cookie for this site only."
            }
            @if let Some(next) = next {
                input type="hidden" name="next" value=(next);
            }
            button type="submit" { "Log in" }
        }
    };
    (status, page("Log in", Nav::None, None, None, body)).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Where to go after logging in: only a console page (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(next) if next.starts_with("/ui/") && !next.contains("//") && !next.contains('\\') => {
            next.to_owned()
        }
        _ => "/ui/instances".to_owned(),
    }
}

pub(crate) async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    if !cookie_safe(token) {
        return login_form(
            StatusCode::BAD_REQUEST,
            form.next.as_deref(),
            Some(
                "this token cannot be kept in a cookie (spaces, quotes, commas, semicolons or backslashes); log in with a token from `drover token create`",
            ),
        );
    }
    let authorization = format!("Bearer {token}");
    match state
        .auth
        .authenticate(&state.store, Some(&authorization))
        .await
    {
        Ok(principal) => {
            tracing::info!(actor = %principal.name, "console login");
            let mut response = Redirect::to(&safe_next(form.next.as_deref())).into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, session_cookie(Some(token), &headers));
            response
        }
        Err(err) => login_form(
            err.status(),
            form.next.as_deref(),
            Some(&err.public_message()),
        ),
    }
}

pub(crate) async fn logout(headers: HeaderMap) -> Response {
    let mut response = Redirect::to("/ui/").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session_cookie(None, &headers));
    response
}

// --- instances ------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub(crate) struct InstancesQuery {
    state: Option<String>,
    campaign: Option<String>,
    workflow: Option<String>,
    id: Option<String>,
    before: Option<String>,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

pub(crate) async fn instances(
    State(state): State<ApiState>,
    session: Session,
    Query(query): Query<InstancesQuery>,
) -> Page {
    let fail = fail(&session);
    if let Some(id) = non_empty(query.id.clone()) {
        return Ok(Redirect::to(&format!("/ui/instances/{}", super::encode(&id))).into_response());
    }
    let paged = query.before.is_some();
    let (filter_state, campaign, workflow, before) = (
        non_empty(query.state),
        non_empty(query.campaign),
        non_empty(query.workflow),
        non_empty(query.before),
    );
    let list = ListQuery {
        state: filter_state.clone(),
        campaign: campaign.clone(),
        workflow: workflow.clone(),
        limit: Some(PAGE_SIZE),
        before,
        ..Default::default()
    };
    let Json(listed) = routes::list_instances(State(state.clone()), ApiQuery(list))
        .await
        .map_err(&fail)?;
    let Json(stats) = routes::stats(State(state.clone())).await.map_err(&fail)?;
    let Json(campaigns) = routes::campaigns(State(state.clone()))
        .await
        .map_err(&fail)?;
    let Json(workflows) = routes::list_workflows(State(state.clone()))
        .await
        .map_err(&fail)?;
    let selected = |a: &Option<String>, b: &str| a.as_deref() == Some(b);
    let filters = |before: Option<String>| {
        let mut q = Vec::new();
        for (key, value) in [
            ("state", &filter_state),
            ("campaign", &campaign),
            ("workflow", &workflow),
        ] {
            if let Some(value) = value {
                q.push(format!("{key}={}", super::encode(value)));
            }
        }
        if let Some(before) = before {
            q.push(format!("before={before}"));
        }
        format!("/ui/instances?{}", q.join("&"))
    };
    let body = html! {
        section aria-labelledby="counts-h" {
            h2 #counts-h.sr-only { "Counts by state" }
            ul.counts #counts data-live {
                @for (s, n) in &stats.instances.0 {
                    li {
                        a href={"/ui/instances?state=" (s.as_str())} {
                            (state_badge(*s)) " " span.count { (n) }
                        }
                    }
                }
            }
        }
        form.filters method="get" action="/ui/instances" role="search" {
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in InstanceState::ALL {
                        option value=(s.as_str()) selected[selected(&filter_state, s.as_str())] { (s.as_str()) }
                    }
                }
            }
            label { "Campaign "
                select name="campaign" {
                    option value="" { "any" }
                    @for c in &campaigns.campaigns {
                        option value=(c.name) selected[selected(&campaign, &c.name)] { (c.name) }
                    }
                }
            }
            label { "Workflow "
                select name="workflow" {
                    option value="" { "any" }
                    @for w in &workflows.workflows {
                        option value=(w.name) selected[selected(&workflow, &w.name)] { (w.name) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        form.filters method="get" action="/ui/instances" role="search" {
            label { "Instance id "
                input type="search" name="id" placeholder="0193…" size="38";
            }
            button type="submit" { "Open" }
        }
        div #list data-live {
            (instance_table(&listed))
            nav.pager aria-label="Pages" {
                @if paged {
                    a href=(filters(None)) { "« Newest" }
                }
                @if let Some(next) = listed.next {
                    a rel="next" href=(filters(Some(next.to_string()))) { "Older »" }
                }
            }
        }
    };
    Ok(page(
        "Instances",
        Nav::Instances,
        Some(&session),
        Some("/ui/live"),
        body,
    )
    .into_response())
}

fn instance_table(listed: &InstanceList) -> Markup {
    html! {
        @if listed.instances.is_empty() {
            p.muted { "No instances match." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Instance" } th scope="col" { "Workflow" }
                    th scope="col" { "Campaign" } th scope="col" { "State" }
                    th scope="col" { "Step" } th scope="col" { "Created" } th scope="col" { "Error" }
                } }
                tbody {
                    @for i in &listed.instances {
                        tr {
                            td { a.id href={"/ui/instances/" (i.id)} { (i.id) } }
                            td { (i.workflow) " v" (i.version) }
                            td { (i.campaign) }
                            td { (state_badge(i.state)) }
                            td { (i.current_step) }
                            td { (time(i.created_at)) }
                            td.error { (i.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

// --- one instance ---------------------------------------------------------------------------

pub(crate) async fn instance(
    State(state): State<ApiState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Page {
    instance_page(&state, &session, &id, None).await
}

async fn instance_page(
    state: &ApiState,
    session: &Session,
    id: &str,
    result: Option<Result<String, String>>,
) -> Page {
    let fail = fail(session);
    let Json(instance) = routes::show_instance(State(state.clone()), ApiPath(id.to_owned()))
        .await
        .map_err(&fail)?;
    let Json(why) = diagnosis::diagnosis(State(state.clone()), ApiPath(id.to_owned()))
        .await
        .map_err(&fail)?;
    let Json(journal) = routes::journal(
        State(state.clone()),
        ApiPath(id.to_owned()),
        ApiQuery(JournalQuery {
            limit: Some(1000),
            after: None,
        }),
    )
    .await
    .map_err(&fail)?;
    let Json(children) = routes::list_instances(
        State(state.clone()),
        ApiQuery(ListQuery {
            parent: Some(id.to_owned()),
            limit: Some(CHILDREN_SHOWN),
            ..Default::default()
        }),
    )
    .await
    .map_err(&fail)?;
    let title = format!("Instance {}", instance.id);
    let body = html! {
        @if let Some(result) = &result { (banner(result)) }
        div hidden data-refresh={"/ui/instances/" (instance.id)} {}
        div #summary data-live {
            dl.facts {
                dt { "State" } dd #state { (state_badge(instance.state)) }
                dt { "Why" } dd #why { (why.summary) }
                dt { "Workflow" } dd { a href={"/ui/workflows/" (instance.workflow) "?version=" (instance.version)} { (instance.workflow) " v" (instance.version) } }
                dt { "Campaign" } dd { (instance.campaign) }
                dt { "Step" } dd { (instance.current_step) " (attempt " (instance.step_attempt) ")" }
                @if let Some(parent) = instance.parent_instance_id {
                    dt { "Parent" } dd { a.id href={"/ui/instances/" (parent)} { (parent) } }
                }
                dt { "Created" } dd { (time(instance.created_at)) }
                @if let Some(finished) = instance.finished_at {
                    dt { "Finished" } dd { (time(finished)) " (" (duration(instance.created_at, finished)) ")" }
                }
                @if let Some(error) = &instance.error {
                    dt { "Error" } dd.error { (error) }
                }
            }
        }
        @if session.is_operator() {
            (actions(&instance))
        }
        section aria-labelledby="vars-h" {
            h2 #vars-h { "Variables" }
            div #vars data-live { (json(&instance.vars)) }
        }
        section aria-labelledby="journal-h" {
            h2 #journal-h { "Journal" }
            div #journal data-live {
                ol.timeline {
                    @for e in &journal.entries {
                        li class={"entry o-" (e.outcome)} {
                            div.line {
                                span.seq { "#" (e.step_seq) }
                                strong.step { (e.step_id) }
                                span.outcome { (e.outcome) }
                                @if let Some(t) = &e.transition { span.muted { "→ " (t) } }
                                span.muted { "attempt " (e.attempt) }
                                span.dur { (duration(e.started_at, e.finished_at)) }
                                (time(e.started_at))
                                @if let Some(actor) = &e.actor { span.muted { "by " (actor) } }
                            }
                            @if let Some(error) = &e.error { div.error { (error) } }
                        }
                    }
                }
                @if journal.next.is_some() { p.muted { "Only the first 1000 entries are shown." } }
            }
        }
        section aria-labelledby="children-h" {
            h2 #children-h { "Children" }
            div #children data-live {
                @if children.instances.is_empty() { p.muted { "None." } }
                @else { (instance_table(&children)) }
            }
        }
    };
    let live = format!("/ui/live?instance={}", instance.id);
    Ok(page(&title, Nav::Instances, Some(session), Some(&live), body).into_response())
}

const COMMANDS: [(&str, &str); 5] = [
    ("pause", "Pause"),
    ("unpause", "Unpause"),
    ("stop", "Stop (after the running step)"),
    ("kill", "Kill (at once)"),
    ("restart", "Restart (as a new instance)"),
];

fn actions(instance: &Instance) -> Markup {
    let action = format!("/ui/instances/{}/action", instance.id);
    let pretty = serde_json::to_string_pretty(&instance.vars).unwrap_or_default();
    html! {
        section aria-labelledby="actions-h" {
            h2 #actions-h { "Actions" }
            div.actions {
                @for (command, label) in COMMANDS {
                    form method="post" action=(action)
                        data-confirm={ (label) " instance " (instance.id) "?" } {
                        input type="hidden" name="action" value=(command);
                        button type="submit" name="do" value=(command) { (label) }
                    }
                }
            }
            @if instance.state == InstanceState::InError {
                form.resume method="post" action=(action)
                    data-confirm={ "Resume instance " (instance.id) " with these variables?" } {
                    input type="hidden" name="action" value="resume";
                    fieldset {
                        legend { "Resume" }
                        label { input type="radio" name="mode" value="current_step" checked; " at the current step (retry " (instance.current_step) ")" }
                        label { input type="radio" name="mode" value="next_step"; " at the next step (skip " (instance.current_step) ")" }
                    }
                    p {
                        label for="set" { "Variables to set (a JSON object; keys not given are kept)" }
                        textarea #set name="set" rows="8" spellcheck="false" { (pretty) }
                    }
                    button type="submit" { "Resume" }
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ActionForm {
    action: String,
    mode: Option<String>,
    set: Option<String>,
    confirmed: Option<String>,
}

pub(crate) async fn instance_action(
    State(state): State<ApiState>,
    session: Session,
    axum::extract::Path(id): axum::extract::Path<String>,
    Form(form): Form<ActionForm>,
) -> Page {
    let fail = fail(&session);
    let route = match form.action.as_str() {
        "resume" => "/v1/instances/{id}/resume",
        "pause" => "/v1/instances/{id}/pause",
        "unpause" => "/v1/instances/{id}/unpause",
        "stop" => "/v1/instances/{id}/stop",
        "kill" => "/v1/instances/{id}/kill",
        "restart" => "/v1/instances/{id}/restart",
        other => {
            return Err(fail(ApiError::bad_request(
                "invalid_body",
                format!("unknown action {other:?}"),
            )));
        }
    };
    session.may(&Method::POST, route).map_err(&fail)?;
    if form.confirmed.as_deref() != Some("1") {
        let mut fields = vec![("action", form.action.as_str())];
        fields.extend(form.mode.as_deref().map(|mode| ("mode", mode)));
        fields.extend(form.set.as_deref().map(|set| ("set", set)));
        return Ok(confirm_page(
            &session,
            Nav::Instances,
            html! { "Really " strong { (form.action) } " instance " code { (id) } "?" },
            &Confirm {
                action: &format!("/ui/instances/{id}/action"),
                fields: &fields,
                yes: &format!("Yes, {}", form.action),
                cancel: &format!("/ui/instances/{id}"),
            },
        ));
    }
    let principal = Extension(session.principal.clone());
    let outcome = match form.action.as_str() {
        "resume" => resume(&state, principal, &id, &form).await,
        command => {
            let (state, path) = (State(state.clone()), ApiPath(id.clone()));
            let done = match command {
                "pause" => lifecycle::handlers::pause(state, principal, path, Bytes::new()).await,
                "unpause" => {
                    lifecycle::handlers::unpause(state, principal, path, Bytes::new()).await
                }
                "stop" => lifecycle::handlers::stop(state, principal, path, Bytes::new()).await,
                "kill" => lifecycle::handlers::kill(state, principal, path, Bytes::new()).await,
                _ => lifecycle::handlers::restart(state, principal, path, Bytes::new()).await,
            };
            done.map(|Json(result)| lifecycle_message(&result))
        }
    };
    let result = outcome.map_err(|err| err.public_message());
    instance_page(&state, &session, &id, Some(result)).await
}

async fn resume(
    state: &ApiState,
    principal: Extension<crate::auth::Principal>,
    id: &str,
    form: &ActionForm,
) -> Result<String, ApiError> {
    let mode = match form.mode.as_deref() {
        Some("next_step") => ResumeMode::NextStep,
        Some("current_step") | None => ResumeMode::CurrentStep,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("unknown resume mode {other:?}"),
            ));
        }
    };
    let set = match form.set.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => {
            let value: Value = serde_json::from_str(text).map_err(|err| {
                ApiError::invalid_field("invalid_body", "set", &format!("not valid JSON: {err}"))
            })?;
            if let Some((field, message)) = unstorable(&value, "set") {
                return Err(ApiError::invalid_field("invalid_request", &field, &message));
            }
            Some(value)
        }
    };
    let Json(instance) = operator::resume(
        State(state.clone()),
        principal,
        ApiPath(id.to_owned()),
        ApiJson(ResumeRequest { mode, set }),
    )
    .await?;
    Ok(format!(
        "resumed at step {}: now {}",
        instance.current_step, instance.state
    ))
}

fn lifecycle_message(result: &LifecycleResult) -> String {
    let mut message = format!(
        "{}: {} (now {})",
        result.action, result.outcome, result.state
    );
    if let Some(new) = result.restarted_as {
        message.push_str(&format!("; restarted as {new}"));
    }
    if !result.cascaded.is_empty() {
        message.push_str(&format!("; {} children too", result.cascaded.len()));
    }
    message
}

/// A form to post again, confirmed.
struct Confirm<'a> {
    /// Where the form posts.
    action: &'a str,
    /// Its fields (besides `confirmed`).
    fields: &'a [(&'a str, &'a str)],
    /// The confirming button's text.
    yes: &'a str,
    /// Where "Cancel" goes.
    cancel: &'a str,
}

/// Without script: the question `data-confirm` would have asked, as a page that posts the same
/// form again with `confirmed=1`.
fn confirm_page(session: &Session, nav: Nav, question: Markup, confirm: &Confirm<'_>) -> Response {
    let body = html! {
        p { (question) }
        form method="post" action=(confirm.action) {
            @for (name, value) in confirm.fields {
                input type="hidden" name=(name) value=(value);
            }
            input type="hidden" name="confirmed" value="1";
            button type="submit" { (confirm.yes) }
            " "
            a href=(confirm.cancel) { "Cancel" }
        }
    };
    page("Confirm", nav, Some(session), None, body).into_response()
}

// --- campaigns ------------------------------------------------------------------------------

pub(crate) async fn campaigns(State(state): State<ApiState>, session: Session) -> Page {
    campaigns_page(&state, &session, None).await
}

async fn campaigns_page(
    state: &ApiState,
    session: &Session,
    result: Option<Result<String, String>>,
) -> Page {
    let fail = fail(session);
    let Json(list) = routes::campaigns(State(state.clone()))
        .await
        .map_err(&fail)?;
    let body = html! {
        @if let Some(result) = &result { (banner(result)) }
        div hidden data-refresh="/ui/campaigns" {}
        div #campaigns data-live {
            table {
                thead { tr {
                    th scope="col" { "Campaign" } th scope="col" { "Limit" }
                    th scope="col" { "Running" } th scope="col" { "Queued" }
                    th scope="col" { "Oldest queued" }
                    @if session.is_operator() { th scope="col" { "Set limit" } th scope="col" { "Admissions" } }
                } }
                tbody {
                    @for c in &list.campaigns {
                        @let scale = c.max_running.map_or(c.running.max(c.queued).max(1), |m| m.max(c.running).max(c.queued).max(1));
                        tr #{"campaign-" (c.name)} {
                            th scope="row" {
                                (c.name)
                                @if let Some(at) = c.paused_at {
                                    " " span.state.s-paused title={ "paused by " (c.paused_by.as_deref().unwrap_or("?")) " at " (at.format("%Y-%m-%d %H:%M:%S")) } { "paused" }
                                }
                            }
                            td.limit { @match c.max_running { Some(m) => (m), None => "unlimited" } }
                            td { (bar(c.running, scale, "running")) }
                            td { (bar(c.queued, scale, "queued")) }
                            td { @match c.oldest_queued_age_ms { Some(ms) => { (ms / 1000) " s" }, None => "—" } }
                            @if session.is_operator() {
                                td {
                                    @if c.max_running.is_some() {
                                        form.inline method="post" action={"/ui/campaigns/" (c.name) "/limit"}
                                            data-confirm={ "Change the limit of campaign " (c.name) "?" } {
                                            label.sr-only for={"limit-" (c.name)} { "New limit of " (c.name) }
                                            input #{"limit-" (c.name)} type="number" name="max_running" min="1"
                                                value=[c.max_running] required;
                                            button type="submit" { "Set" }
                                        }
                                    } @else {
                                        span.muted { "unlimited" }
                                    }
                                }
                            }
                            @if session.is_operator() && c.max_running.is_some() {
                                td {
                                    @let pause = c.paused_at.is_none();
                                    form.inline method="post" action={"/ui/campaigns/" (c.name) "/pause"}
                                        data-confirm={ (if pause { "Pause" } else { "Unpause" }) " campaign " (c.name) "?" } {
                                        input type="hidden" name="pause" value=(if pause { "1" } else { "0" });
                                        button type="submit" { (if pause { "Pause" } else { "Unpause" }) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(page(
        "Campaigns",
        Nav::Campaigns,
        Some(session),
        Some("/ui/live"),
        body,
    )
    .into_response())
}

fn bar(value: i32, scale: i32, what: &str) -> Markup {
    let percent = (f64::from(value) * 100.0 / f64::from(scale.max(1))).clamp(0.0, 100.0);
    html! {
        span.bar role="img" aria-label={ (value) " " (what) } {
            span class={"fill " (what)} style={"width:" (format!("{percent:.0}")) "%"} {}
        }
        " " span.num { (value) }
    }
}

#[derive(Deserialize)]
pub(crate) struct LimitForm {
    max_running: String,
    confirmed: Option<String>,
}

pub(crate) async fn set_limit(
    State(state): State<ApiState>,
    session: Session,
    axum::extract::Path(name): axum::extract::Path<String>,
    Form(form): Form<LimitForm>,
) -> Page {
    let fail = fail(&session);
    session
        .may(&Method::PUT, "/v1/campaigns/{name}/limit")
        .map_err(&fail)?;
    if form.confirmed.as_deref() != Some("1") {
        return Ok(confirm_page(
            &session,
            Nav::Campaigns,
            html! { "Set the limit of campaign " strong { (name) } " to " strong { (form.max_running) } "?" },
            &Confirm {
                action: &format!("/ui/campaigns/{name}/limit"),
                fields: &[("max_running", form.max_running.as_str())],
                yes: "Yes, set it",
                cancel: "/ui/campaigns",
            },
        ));
    }
    let outcome = match form.max_running.trim().parse::<i64>() {
        Err(_) => Err(ApiError::invalid_field(
            "invalid_body",
            "max_running",
            "must be a whole number",
        )),
        Ok(max_running) => crate::campaigns::set_limit(
            State(state.clone()),
            Extension(session.principal.clone()),
            ApiPath(Slug(name.clone())),
            ApiJson(SetLimit { max_running }),
        )
        .await
        .map(|Json(changed)| {
            format!(
                "campaign {}: limit {} → {}; {} admitted",
                name,
                changed.previous,
                changed.campaign.max_running.unwrap_or_default(),
                changed.admitted.len()
            )
        }),
    };
    campaigns_page(
        &state,
        &session,
        Some(outcome.map_err(|e| e.public_message())),
    )
    .await
}

#[derive(Deserialize)]
pub(crate) struct PauseForm {
    /// "1" to pause, "0" to unpause.
    pause: String,
    confirmed: Option<String>,
}

/// Pauses or unpauses a limited campaign's admissions, after a confirmation.
pub(crate) async fn pause_campaign(
    State(state): State<ApiState>,
    session: Session,
    axum::extract::Path(name): axum::extract::Path<String>,
    Form(form): Form<PauseForm>,
) -> Page {
    let fail = fail(&session);
    let pause = form.pause == "1";
    let route = if pause {
        "/v1/campaigns/{name}/pause"
    } else {
        "/v1/campaigns/{name}/unpause"
    };
    session.may(&Method::POST, route).map_err(&fail)?;
    let verb = if pause { "Pause" } else { "Unpause" };
    if form.confirmed.as_deref() != Some("1") {
        return Ok(confirm_page(
            &session,
            Nav::Campaigns,
            html! { (verb) " campaign " strong { (name) } "?" },
            &Confirm {
                action: &format!("/ui/campaigns/{name}/pause"),
                fields: &[("pause", form.pause.as_str())],
                yes: &format!("Yes, {} it", verb.to_lowercase()),
                cancel: "/ui/campaigns",
            },
        ));
    }
    let (principal, path) = (
        Extension(session.principal.clone()),
        ApiPath(Slug(name.clone())),
    );
    let changed = if pause {
        crate::deletes::pause_campaign(State(state.clone()), principal, path).await
    } else {
        crate::deletes::unpause_campaign(State(state.clone()), principal, path).await
    };
    let outcome = changed.map(|Json(view)| match (pause, view.changed) {
        (true, true) => format!("campaign {name} paused: it admits nothing until unpaused"),
        (false, true) => format!("campaign {name} unpaused; {} admitted", view.admitted.len()),
        (true, false) => format!("campaign {name} was paused already"),
        (false, false) => format!("campaign {name} was not paused"),
    });
    campaigns_page(
        &state,
        &session,
        Some(outcome.map_err(|e| e.public_message())),
    )
    .await
}

// --- workflows ------------------------------------------------------------------------------

pub(crate) async fn workflows(State(state): State<ApiState>, session: Session) -> Page {
    let fail = fail(&session);
    let Json(list) = routes::list_workflows(State(state.clone()))
        .await
        .map_err(&fail)?;
    let body = html! {
        @if list.workflows.is_empty() { p.muted { "No workflow is deployed." } }
        @else {
            table {
                thead { tr {
                    th scope="col" { "Workflow" } th scope="col" { "Latest version" }
                    th scope="col" { "Steps" } th scope="col" { "Deployed" } th scope="col" { "Description" }
                } }
                tbody {
                    @for w in &list.workflows {
                        tr {
                            th scope="row" { a href={"/ui/workflows/" (w.name)} { (w.name) } }
                            td { (w.version) } td { (w.steps) } td { (time(w.created_at)) }
                            td { (w.description.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    };
    Ok(page("Workflows", Nav::Workflows, Some(&session), None, body).into_response())
}

pub(crate) async fn workflow(
    State(state): State<ApiState>,
    session: Session,
    ApiPath(Slug(name)): ApiPath<Slug>,
    Query(query): Query<VersionQuery>,
) -> Page {
    let fail = fail(&session);
    let Json(latest) = routes::show_workflow(
        State(state.clone()),
        ApiPath(Slug(name.clone())),
        ApiQuery(VersionQuery { version: None }),
    )
    .await
    .map_err(&fail)?;
    let shown = match query.version {
        Some(version) if version != latest.version => {
            routes::show_workflow(
                State(state.clone()),
                ApiPath(Slug(name.clone())),
                ApiQuery(VersionQuery {
                    version: Some(version),
                }),
            )
            .await
            .map_err(&fail)?
            .0
        }
        _ => latest.clone(),
    };
    let drawn = match Definition::parse(&shown.source) {
        Ok(definition) => graph::svg(&definition),
        Err(errors) => {
            html! { p.error { "The definition no longer parses: " (errors.to_string()) } }
        }
    };
    let body = html! {
        nav.versions aria-label="Versions" {
            "Versions: "
            @for v in (1..=latest.version).rev() {
                @if v == shown.version {
                    strong aria-current="page" { "v" (v) }
                } @else {
                    a href={"/ui/workflows/" (name) "?version=" (v)} { "v" (v) }
                }
                " "
            }
        }
        p.muted { "v" (shown.version) ", deployed " (time(shown.created_at)) ". "
            a href={"/ui/instances?workflow=" (name)} { "Its instances" } }
        section aria-labelledby="graph-h" {
            h2 #graph-h { "Steps and transitions" }
            div.graph { (drawn) }
        }
        section aria-labelledby="source-h" {
            h2 #source-h { "Definition" }
            pre.source { (shown.source) }
        }
    };
    let title = format!("Workflow {name}");
    Ok(page(&title, Nav::Workflows, Some(&session), None, body).into_response())
}

// --- schedules, nodes -----------------------------------------------------------------------

pub(crate) async fn schedules(State(state): State<ApiState>, session: Session) -> Page {
    let fail = fail(&session);
    let Json(list) = schedules::list(State(state.clone())).await.map_err(&fail)?;
    let body = html! {
        @if list.schedules.is_empty() { p.muted { "No schedules." } }
        @else {
            table #schedules data-live {
                thead { tr {
                    th scope="col" { "Schedule" } th scope="col" { "Workflow" } th scope="col" { "Campaign" }
                    th scope="col" { "When" } th scope="col" { "Next fire" } th scope="col" { "Last fire" }
                    th scope="col" { "Paused" }
                } }
                tbody {
                    @for s in &list.schedules {
                        tr {
                            th scope="row" { (s.name) }
                            td { a href={"/ui/workflows/" (s.workflow)} { (s.workflow) } }
                            td { (s.campaign) }
                            td {
                                @if let Some(cron) = &s.cron { code { (cron) } " " (s.timezone.as_deref().unwrap_or("UTC")) }
                                @if let Some(every) = &s.every { "every " (every) }
                            }
                            td { @match s.next_fire_at { Some(at) => (time(at)), None => "—" } }
                            td {
                                @if let Some(fire) = &s.last_fire {
                                    (time(fire.fire_at)) " " (fire.outcome)
                                    @if let Some(id) = fire.instance { " " a.id href={"/ui/instances/" (id)} { "instance" } }
                                } @else { "—" }
                            }
                            td { @if s.paused { "paused" @if let Some(note) = &s.note { ": " (note) } } @else { "no" } }
                        }
                    }
                }
            }
        }
    };
    Ok(page(
        "Schedules",
        Nav::Schedules,
        Some(&session),
        Some("/ui/live"),
        body,
    )
    .into_response())
}

pub(crate) async fn nodes(State(state): State<ApiState>, session: Session) -> Page {
    let fail = fail(&session);
    let Json(list) = routes::nodes(State(state.clone())).await.map_err(&fail)?;
    let leader = operator::leader(State(state.clone()))
        .await
        .ok()
        .map(|Json(l)| l);
    let body = html! {
        div #nodes data-live {
            p #leader {
                @match &leader {
                    Some(l) if l.live => {
                        "Leader: " code { (l.holder.map(|h| h.to_string()).unwrap_or_default()) }
                        " (term " (l.term) ", lease until " (time(l.expires_at)) ")"
                    },
                    Some(l) => { "No live leader (last term " (l.term) ", expired " (time(l.expires_at)) ")." },
                    None => "No coordinator has ever led this cluster.",
                }
            }
            table {
                thead { tr {
                    th scope="col" { "Node" } th scope="col" { "Status" } th scope="col" { "Roles" }
                    th scope="col" { "Queues" } th scope="col" { "Host" } th scope="col" { "In flight" }
                    th scope="col" { "Memory" } th scope="col" { "Heartbeat" } th scope="col" { "Version" }
                } }
                tbody {
                    @for n in &list.nodes {
                        @let leads = leader.as_ref().is_some_and(|l| l.live && l.holder == Some(n.id));
                        tr {
                            td { code { (n.id) } @if leads { " " span.state.s-running { "leader" } } }
                            td { (n.status) }
                            td { (n.roles.join(", ")) }
                            td { (n.queues.join(", ")) }
                            td { (n.host) }
                            td { (n.in_flight) }
                            td { (n.rss_bytes / (1024 * 1024)) " MiB" }
                            td { (time(n.heartbeat_at)) }
                            td { (n.version) }
                        }
                    }
                }
            }
        }
    };
    Ok(page("Nodes", Nav::Nodes, Some(&session), Some("/ui/live"), body).into_response())
}
