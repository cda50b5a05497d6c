//! A workflow's steps and transitions drawn as SVG, server-side: steps in layers by their
//! distance from the entry step (breadth first), edges downwards or within a layer as straight
//! arrows, edges back up (loops) as curves on the right. Each edge carries its
//! condition, shortened; the full text is the edge's `<title>` (a tooltip).

use std::collections::{HashMap, VecDeque};

use drover_core::Definition;
use maud::{Markup, html};

const BOX_W: f64 = 170.0;
const BOX_H: f64 = 44.0;
const GAP_X: f64 = 40.0;
const GAP_Y: f64 = 70.0;
const MARGIN: f64 = 20.0;
/// Room on the right for the curves of back edges.
const LOOP_ROOM: f64 = 120.0;
const LABEL_CHARS: usize = 22;

struct Placed {
    x: f64,
    y: f64,
}

/// The layer of each step: its breadth-first distance from `steps[0]`; unreachable steps go
/// one layer below the deepest.
fn layers(definition: &Definition) -> Vec<usize> {
    let index: HashMap<&str, usize> = definition
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut layer = vec![usize::MAX; definition.steps.len()];
    let mut queue = VecDeque::new();
    if !definition.steps.is_empty() {
        layer[0] = 0;
        queue.push_back(0);
    }
    while let Some(at) = queue.pop_front() {
        for t in &definition.steps[at].next {
            if let Some(&to) = index.get(t.to.as_str())
                && layer[to] == usize::MAX
            {
                layer[to] = layer[at] + 1;
                queue.push_back(to);
            }
        }
    }
    let deepest = layer
        .iter()
        .filter(|l| **l != usize::MAX)
        .max()
        .copied()
        .unwrap_or(0);
    layer
        .into_iter()
        .map(|l| if l == usize::MAX { deepest + 1 } else { l })
        .collect()
}

fn short(text: &str) -> String {
    if text.chars().count() <= LABEL_CHARS {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(LABEL_CHARS - 1).collect();
        format!("{cut}…")
    }
}

pub(crate) fn svg(definition: &Definition) -> Markup {
    let layer = layers(definition);
    let depth = layer.iter().max().copied().unwrap_or(0) + 1;
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); depth];
    for (step, l) in layer.iter().enumerate() {
        rows[*l].push(step);
    }
    let widest = rows.iter().map(Vec::len).max().unwrap_or(1).max(1) as f64;
    let inner = widest * BOX_W + (widest - 1.0) * GAP_X;
    let width = inner + 2.0 * MARGIN + LOOP_ROOM;
    let height = depth as f64 * (BOX_H + GAP_Y) - GAP_Y + 2.0 * MARGIN;
    let mut placed: Vec<Placed> = (0..definition.steps.len())
        .map(|_| Placed { x: 0.0, y: 0.0 })
        .collect();
    for (l, row) in rows.iter().enumerate() {
        let row_w = row.len() as f64 * BOX_W + (row.len().saturating_sub(1)) as f64 * GAP_X;
        let start = MARGIN + (inner - row_w) / 2.0;
        for (i, step) in row.iter().enumerate() {
            placed[*step] = Placed {
                x: start + i as f64 * (BOX_W + GAP_X),
                y: MARGIN + l as f64 * (BOX_H + GAP_Y),
            };
        }
    }
    let index: HashMap<&str, usize> = definition
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let right = MARGIN + inner;
    let mut edges = Vec::new();
    for (from, step) in definition.steps.iter().enumerate() {
        for (order, t) in step.next.iter().enumerate() {
            let Some(&to) = index.get(t.to.as_str()) else {
                continue;
            };
            let (a, b) = (&placed[from], &placed[to]);
            let when = t.when.as_ref().map(|w| w.source().to_owned());
            let label = when.as_deref().map(short);
            let title = format!(
                "{} → {}{}",
                step.id,
                t.to,
                when.as_deref()
                    .map(|w| format!(" when {w}"))
                    .unwrap_or_default()
            );
            let path;
            let (lx, ly);
            if layer[to] > layer[from] {
                let (x1, y1) = (a.x + BOX_W / 2.0, a.y + BOX_H);
                let (x2, y2) = (b.x + BOX_W / 2.0, b.y);
                path = format!("M{x1:.1},{y1:.1} L{x2:.1},{y2:.1}");
                (lx, ly) = ((x1 + x2) / 2.0 + 4.0, (y1 + y2) / 2.0 + order as f64 * 12.0);
            } else if layer[to] == layer[from] && from != to {
                // Within a layer: side to side.
                let (x1, x2) = if b.x > a.x {
                    (a.x + BOX_W, b.x)
                } else {
                    (a.x, b.x + BOX_W)
                };
                let y = a.y + BOX_H / 2.0;
                path = format!("M{x1:.1},{y:.1} L{x2:.1},{y:.1}");
                (lx, ly) = ((x1 + x2) / 2.0 - 20.0, y - 6.0);
            } else {
                // Back up, or to itself: around the right side.
                let (x1, y1) = (a.x + BOX_W, a.y + BOX_H / 2.0);
                let (x2, y2) = (b.x + BOX_W, b.y + BOX_H / 2.0 + 6.0);
                let bulge = right + 30.0 + order as f64 * 20.0;
                path = format!(
                    "M{x1:.1},{y1:.1} C{bulge:.1},{y1:.1} {bulge:.1},{y2:.1} {x2:.1},{y2:.1}"
                );
                (lx, ly) = (bulge - 20.0, (y1 + y2) / 2.0);
            }
            edges.push((path, label, title, lx, ly));
        }
    }
    let aria = format!(
        "Graph of {} steps: {}",
        definition.steps.len(),
        definition
            .steps
            .iter()
            .map(|s| format!(
                "{} ({}) to {}",
                s.id,
                s.kind.name(),
                if s.next.is_empty() {
                    "nothing".to_owned()
                } else {
                    s.next
                        .iter()
                        .map(|t| t.to.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                }
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    html! {
        svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label=(aria)
            width=(format!("{width:.0}")) height=(format!("{height:.0}"))
            viewBox=(format!("0 0 {width:.0} {height:.0}")) {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M0,0 L10,5 L0,10 z" fill="currentColor" {}
                }
            }
            @for (path, label, title, lx, ly) in &edges {
                g.edge {
                    title { (title) }
                    path d=(path) fill="none" stroke="currentColor" marker-end="url(#arrow)" {}
                    @if let Some(label) = label {
                        text.cond x=(format!("{lx:.1}")) y=(format!("{ly:.1}")) { (label) }
                    }
                }
            }
            @for (i, step) in definition.steps.iter().enumerate() {
                @let p = &placed[i];
                g class={"node k-" (step.kind.name())} {
                    title { (step.id) " (" (step.kind.name()) ")" }
                    rect x=(format!("{:.1}", p.x)) y=(format!("{:.1}", p.y)) width=(BOX_W) height=(BOX_H) rx="6" {}
                    text x=(format!("{:.1}", p.x + BOX_W / 2.0)) y=(format!("{:.1}", p.y + 18.0)) text-anchor="middle" class="sid" { (short(&step.id)) }
                    text x=(format!("{:.1}", p.x + BOX_W / 2.0)) y=(format!("{:.1}", p.y + 34.0)) text-anchor="middle" class="kind" { (step.kind.name()) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_and_unreachable_steps_get_layers() {
        let definition = Definition::parse(
            r#"
name: g
steps:
  - { id: a, kind: assign, set: { n: "1" }, next: [{ to: b }] }
  - { id: b, kind: assign, set: { n: "vars.n + 1" }, next: [{ to: b, when: "vars.n < 3" }, { to: c }] }
  - { id: c, kind: end, status: completed }
"#,
        )
        .expect("valid");
        assert_eq!(layers(&definition), vec![0, 1, 2]);
        let drawn = svg(&definition).into_string();
        assert!(drawn.contains("vars.n &lt; 3"), "{drawn}");
        assert!(drawn.matches("<rect").count() == 3);
    }
}
