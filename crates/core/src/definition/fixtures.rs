//! What the tests of the definition modules share: the documented example, and ways to read
//! a source's errors.

use super::{Definition, DefinitionError, DefinitionErrors};

/// The example of DEFINITIONS.md, verbatim.
pub(super) const EXAMPLE: &str = r#"
name: welcome-series          # slug: [a-z0-9][a-z0-9_-]{0,62}; identifies the workflow
description: Greets new customers and follows up   # optional, free text
vars:                         # optional initial variables; `drover start --vars` overrides keys
  n: 0
  email: null
steps:                        # the first step is the entry point
  - id: count                 # slug, unique in the workflow
    kind: assign
    set:                      # variable -> CEL expression over `vars`, `steps`, `instance`
      n: "vars.n + 1"
    next:
      - to: record

  - id: record
    kind: http
    method: POST              # GET | POST | PUT | PATCH | DELETE
    url: "http://127.0.0.1:9000/record"      # literal string
    headers: { X-Campaign: spring }          # optional literal headers
    body:                     # optional: JSON object, each value a CEL expression
      n: "vars.n"
      id: "instance.id"
    timeout: 10s              # per attempt; default 30s
    retry: { max_attempts: 5, backoff: 200ms, max_backoff: 10s }   # exponential; defaults 3, 1s, 60s
    allow_retry: true         # false: never re-run this step automatically after an interruption
    next:                     # ordered; the first whose `when` is true wins; no `when` = always
      - to: count
        when: "vars.n < 10"
      - to: done

  - id: done
    kind: end
    status: completed         # completed | failed
"#;

pub(super) fn errors_of(source: &str) -> Vec<DefinitionError> {
    match Definition::parse(source) {
        Ok(_) => Vec::new(),
        Err(DefinitionErrors(errors)) => errors,
    }
}

/// Asserts that parsing fails with an error on `step`/`field` whose message contains `needle`.
#[track_caller]
pub(super) fn assert_error(source: &str, step: Option<&str>, field: &str, needle: &str) {
    let errors = errors_of(source);
    assert!(
        errors
            .iter()
            .any(|e| e.step.as_deref() == step && e.field == field && e.message.contains(needle)),
        "no error on {step:?}/{field} containing {needle:?} in {errors:#?}"
    );
}

/// A two-step workflow with `extra` spliced into its first step.
pub(super) fn with_first_step(extra: &str) -> String {
    format!(
        "name: w\nsteps:\n  - id: a\n{extra}\n  - id: b\n    kind: end\n    status: completed\n"
    )
}
