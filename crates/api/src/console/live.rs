//! `/ui/live`: server-sent events fed by the event stream. Each connection subscribes to the
//! relayed events on NATS (all, or one instance's) and sends at most one `change` event per
//! [`COALESCE`] with how many events arrived; the page's script then reloads its `data-live`
//! regions. The stream ends when the API stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use drover_bus::EventSeen;
use futures::{Stream, StreamExt as _};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::Session;
use super::pages::error_page;
use crate::ApiState;
use crate::error::ApiError;
use crate::extract::parse_id;

/// Events arriving within this window are sent as one `change`.
const COALESCE: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
pub(crate) struct LiveQuery {
    instance: Option<String>,
}

pub(crate) async fn stream(
    State(state): State<ApiState>,
    session: Session,
    Query(query): Query<LiveQuery>,
) -> Response {
    let instance = match query.instance.as_deref().map(parse_id).transpose() {
        Ok(instance) => instance,
        Err(err) => return error_page(Some(&session), &err),
    };
    let events = match state.bus.follow_events(instance).await {
        Ok(events) => events,
        Err(err) => return error_page(Some(&session), &ApiError::Bus(err)),
    };
    Sse::new(changes(events, state.live_stop.clone()))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One `change` event (data: the number of events and the last one's `instance kind`) per
/// burst of events, until the subscription or the API ends.
fn changes(
    events: impl Stream<Item = EventSeen> + Send + Unpin + 'static,
    stop: CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((events, stop), |(mut events, stop)| async move {
        let mut last = tokio::select! {
            () = stop.cancelled() => return None,
            seen = events.next() => seen?,
        };
        let mut count = 1u64;
        let deadline = tokio::time::sleep(COALESCE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = stop.cancelled() => return None,
                () = &mut deadline => break,
                seen = events.next() => match seen {
                    Some(seen) => {
                        count += 1;
                        last = seen;
                    }
                    None => break,
                },
            }
        }
        let event = Event::default()
            .event("change")
            .data(format!("{count} {} {}", last.instance, last.kind));
        Some((Ok(event), (events, stop)))
    })
}
