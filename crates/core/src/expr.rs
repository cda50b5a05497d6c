//! CEL expressions: compiled once when a definition is parsed, evaluated whenever a step runs.
//!
//! Values cross between JSON and CEL without losing their type where CEL has one: a JSON
//! integer is a CEL `int` (so `vars.n + 1` works), and CEL results come back as the JSON they
//! denote. Timestamps become RFC 3339 strings and durations CEL's own `"1.5s"` form, since
//! JSON has neither.
//!
//! The CEL parser and interpreter recurse once per level of the syntax tree, with large frames
//! (the generated ANTLR parser takes over 100 KiB of stack per bracket level in a debug build).
//! An overflow aborts the process, so depth is bounded: operators are counted before parsing,
//! parsing runs on its own thread with a large stack, and a tree deeper than
//! [`MAX_EXPR_DEPTH`] is rejected, which keeps evaluation shallow on any caller's stack.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr as Node};
use cel::common::value::Val;
use cel::objects::{Key, Map as CelMap};
use cel::parser::Expression;
use cel::{Context, Env, Value as Cel};
use serde_json::{Map, Number, Value};

/// The longest expression accepted, in bytes of source.
pub const MAX_EXPR_BYTES: usize = 64 * 1024;
/// The deepest syntax tree accepted; real expressions stay well under it.
pub const MAX_EXPR_DEPTH: usize = 32;
/// Operator and bracket characters accepted, counted anywhere (string literals included, so
/// the count is a true upper bound on how long an operator chain can be).
pub const MAX_EXPR_OPERATORS: usize = 1024;
/// Stack of the parsing thread: enough for [`MAX_EXPR_OPERATORS`] chained operators nested
/// [`MAX_EXPR_DEPTH`] brackets deep in a debug build. Only the pages touched are committed.
const PARSE_STACK_BYTES: usize = 64 * 1024 * 1024;

/// The names an expression can see, in the order they are documented.
const ROOTS: [&str; 4] = ["vars", "steps", "instance", "output"];

/// Namespaces of the standard library's qualified functions (`optional.of(1)`): a call on one
/// of these names calls a function, it does not read a variable.
const FUNCTION_NAMESPACES: [&str; 1] = ["optional"];

/// One standard environment for compiling and running, so the macros a program was compiled
/// with are the ones it runs with, and the standard library is built once.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled CEL expression; compile once at parse time, evaluate many times.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<Expression>,
    /// Which of [`ROOTS`] the program references: only those are converted into CEL values
    /// when it runs, so `vars.n + 1` does not copy every step's output.
    uses: [bool; 4],
}

/// What an expression can see: `vars`, `steps` (latest output of each completed step, keyed by
/// step id), `instance` (id, workflow, version, campaign, started_at), and `output` (only in a
/// step's own `next`).
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub vars: &'a Map<String, Value>,
    pub steps: &'a Map<String, Value>,
    pub instance: &'a Value,
    pub output: Option<&'a Value>,
}

/// An expression that does not compile, or fails when it runs; names the expression.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("expression `{expr}`: {message}")]
pub struct ExprError {
    pub expr: String,
    pub message: String,
}

impl Expr {
    /// Compiles `source`, rejecting more than [`MAX_EXPR_BYTES`], [`MAX_EXPR_OPERATORS`] or
    /// [`MAX_EXPR_DEPTH`].
    pub fn compile(source: &str) -> Result<Expr, ExprError> {
        let error = |message: String| ExprError {
            expr: source.to_owned(),
            message,
        };
        if source.len() > MAX_EXPR_BYTES {
            return Err(error(format!(
                "{} bytes long, the limit is {MAX_EXPR_BYTES} (64 KiB)",
                source.len()
            )));
        }
        let operators = source
            .bytes()
            .filter(|b| b"+-*/%<>=!&|?:.[({".contains(b))
            .count();
        if operators > MAX_EXPR_OPERATORS {
            return Err(error(format!(
                "{operators} operator and bracket characters, the limit is {MAX_EXPR_OPERATORS}"
            )));
        }
        let program = on_parse_stack(|| parse(source))
            .and_then(|parsed| parsed)
            .map_err(error)?;
        let uses = {
            let references = program.references();
            ROOTS.map(|root| references.has_variable(root))
        };
        Ok(Expr {
            source: source.into(),
            program: Arc::new(program),
            uses,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The free identifiers the expression reads that are not variables of the scope (`vars`,
    /// `steps`, `instance`, `output`), a standard type (`int`, `string`, …) or a standard
    /// function namespace; names bound by a macro (`x` in `l.all(x, x > 0)`) are not free.
    /// Sorted, without repeats; each would fail as an undeclared reference when it runs.
    pub fn undeclared(&self) -> Vec<String> {
        let mut names: Vec<String> = free_identifiers(&self.program)
            .into_iter()
            .filter(|name| !ROOTS.contains(&name.as_str()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether the expression reads `output`, which only a step's own `next` can see.
    pub fn uses_output(&self) -> bool {
        free_identifiers(&self.program)
            .iter()
            .any(|name| name == "output")
    }

    /// Evaluates to JSON; an error (a missing key, a type mismatch, a result JSON cannot hold)
    /// names the expression.
    pub fn eval(&self, scope: &Scope<'_>) -> Result<Value, ExprError> {
        let value = self.execute(scope)?;
        cel_to_json(&value).map_err(|message| self.error(message))
    }

    /// For `when`: must evaluate to a bool, anything else is an error (never silently false).
    pub fn eval_bool(&self, scope: &Scope<'_>) -> Result<bool, ExprError> {
        match self.execute(scope)? {
            Cel::Bool(b) => Ok(b),
            other => Err(self.error(format!(
                "must evaluate to a bool, but evaluated to a {}",
                other.type_of()
            ))),
        }
    }

    fn execute(&self, scope: &Scope<'_>) -> Result<Cel, ExprError> {
        let mut context = Context::with_env(Arc::clone(&ENV));
        let values = [
            Some(object_to_cel(scope.vars)),
            Some(object_to_cel(scope.steps)),
            Some(json_to_cel(scope.instance)),
            scope.output.map(json_to_cel),
        ];
        for ((name, used), value) in ROOTS.iter().zip(self.uses).zip(values) {
            // An absent `output` stays undeclared, so using it outside `next` is an error.
            if let (true, Some(value)) = (used, value) {
                let value = Box::<dyn Val>::try_from(value)
                    .map_err(|e| self.error(format!("cannot bind `{name}`: {e}")))?;
                context.add_variable_as_val(*name, value);
            }
        }
        Cel::resolve(&self.program, &context).map_err(|e| self.error(e.to_string()))
    }

    fn error(&self, message: String) -> ExprError {
        ExprError {
            expr: self.source.to_string(),
            message,
        }
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

/// Two expressions are equal when their sources are: the program is a function of the source.
impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Expr {}

/// Evaluates every `(key, expr)` in order against the same scope (a later key does not see an
/// earlier result); the error names the key.
pub fn eval_map(
    entries: &[(String, Expr)],
    scope: &Scope<'_>,
) -> Result<Map<String, Value>, (String, ExprError)> {
    entries
        .iter()
        .map(|(key, expr)| match expr.eval(scope) {
            Ok(value) => Ok((key.clone(), value)),
            Err(e) => Err((key.clone(), e)),
        })
        .collect()
}

thread_local! {
    static ON_PARSE_STACK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on a thread with a stack large enough for the CEL parser, or right here when this
/// already is one: a definition is parsed on one such thread, not one per expression. A panic
/// in `f` comes back as an error.
pub(crate) fn on_parse_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, String> {
    if ON_PARSE_STACK.with(Cell::get) {
        return Ok(f());
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("drover-parse".into())
            .stack_size(PARSE_STACK_BYTES)
            .spawn_scoped(scope, || {
                ON_PARSE_STACK.with(|on| on.set(true));
                f()
            })
            .map_err(|e| format!("cannot start a parsing thread: {e}"))?
            .join()
            .map_err(|_| "the parser failed unexpectedly".to_owned())
    })
}

/// Parses and checks the depth; on the parsing thread, so even dropping a rejected tree
/// happens on its large stack.
fn parse(source: &str) -> Result<Expression, String> {
    let parser = ENV.parser().max_recursion_depth(MAX_EXPR_DEPTH as u16);
    let program = parser.parse(source).map_err(|errors| {
        if errors
            .errors
            .iter()
            .any(|e| e.msg.contains("Recursion limit"))
        {
            return format!("nests more than {MAX_EXPR_DEPTH} levels deep");
        }
        // The parser's own rendering spans lines; a definition error is one line.
        let parts: Vec<String> = errors
            .errors
            .iter()
            .map(|e| format!("{}:{}: {}", e.pos.0, e.pos.1, e.msg))
            .collect();
        format!("does not compile: {}", parts.join("; "))
    })?;
    let depth = depth(&program);
    if depth > MAX_EXPR_DEPTH {
        return Err(format!(
            "nests {depth} levels deep, the limit is {MAX_EXPR_DEPTH}"
        ));
    }
    Ok(program)
}

/// The depth of a syntax tree, walked without recursion.
fn depth(root: &Expression) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(root, 1)];
    while let Some((node, depth)) = pending.pop() {
        deepest = deepest.max(depth);
        let children: Vec<&Expression> = match &node.expr {
            Node::Unspecified | Node::Ident(_) | Node::Literal(_) => Vec::new(),
            Node::Call(call) => call
                .target
                .as_deref()
                .into_iter()
                .chain(&call.args)
                .collect(),
            Node::Comprehension(c) => {
                vec![
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ]
            }
            Node::List(list) => list.elements.iter().collect(),
            Node::Map(map) => map
                .entries
                .iter()
                .flat_map(|e| entry_children(&e.expr))
                .collect(),
            Node::Struct(s) => s
                .entries
                .iter()
                .flat_map(|e| entry_children(&e.expr))
                .collect(),
            Node::Select(select) => vec![select.operand.as_ref()],
        };
        pending.extend(children.into_iter().map(|child| (child, depth + 1)));
    }
    deepest
}

/// The identifiers read free, outside any macro binding them, that are neither a standard type
/// nor a function namespace; walked without recursion.
fn free_identifiers(root: &Expression) -> Vec<String> {
    let is_type = |name: &str| ENV.types().find_type(name).is_some();
    let mut free = Vec::new();
    // Each node with the names the macros around it bind.
    let mut pending: Vec<(&Expression, Arc<Vec<&str>>)> = vec![(root, Arc::new(Vec::new()))];
    while let Some((node, bound)) = pending.pop() {
        match &node.expr {
            Node::Unspecified | Node::Literal(_) => {}
            Node::Ident(name) => {
                // Macro accumulators (`@result`) cannot be written by hand.
                if !name.starts_with('@') && !bound.contains(&name.as_str()) && !is_type(name) {
                    free.push(name.clone());
                }
            }
            Node::Select(select) => {
                // A qualified type name such as `google.protobuf.Duration`.
                let qualified = qualified_name(node);
                if !qualified
                    .as_deref()
                    .is_some_and(|name| !bound.contains(&root_of(name)) && is_type(name))
                {
                    pending.push((&select.operand, bound));
                }
            }
            Node::Call(call) => {
                if let Some(target) = call.target.as_deref() {
                    let namespaced = qualified_name(target).is_some_and(|name| {
                        let root = root_of(&name);
                        !bound.contains(&root) && FUNCTION_NAMESPACES.contains(&root)
                    });
                    if !namespaced {
                        pending.push((target, Arc::clone(&bound)));
                    }
                }
                pending.extend(call.args.iter().map(|arg| (arg, Arc::clone(&bound))));
            }
            Node::Comprehension(c) => {
                pending.push((&c.iter_range, Arc::clone(&bound)));
                pending.push((&c.accu_init, Arc::clone(&bound)));
                let mut inner = (*bound).clone();
                inner.push(&c.iter_var);
                inner.extend(c.iter_var2.as_deref());
                inner.push(&c.accu_var);
                let inner = Arc::new(inner);
                for child in [&c.loop_cond, &c.loop_step, &c.result] {
                    pending.push((child, Arc::clone(&inner)));
                }
            }
            Node::List(list) => {
                pending.extend(list.elements.iter().map(|e| (e, Arc::clone(&bound))));
            }
            Node::Map(map) => pending.extend(
                map.entries
                    .iter()
                    .flat_map(|e| entry_children(&e.expr))
                    .map(|e| (e, Arc::clone(&bound))),
            ),
            Node::Struct(s) => pending.extend(
                s.entries
                    .iter()
                    .flat_map(|e| entry_children(&e.expr))
                    .map(|e| (e, Arc::clone(&bound))),
            ),
        }
    }
    free
}

/// `a.b.c` for a chain of field selections on an identifier; `None` for anything else.
fn qualified_name(node: &Expression) -> Option<String> {
    match &node.expr {
        Node::Ident(name) => Some(name.clone()),
        Node::Select(select) if !select.test => Some(format!(
            "{}.{}",
            qualified_name(&select.operand)?,
            select.field
        )),
        _ => None,
    }
}

fn root_of(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

fn entry_children(entry: &EntryExpr) -> Vec<&Expression> {
    match entry {
        EntryExpr::MapEntry(e) => vec![&e.key, &e.value],
        EntryExpr::StructField(f) => vec![&f.value],
    }
}

fn object_to_cel(object: &Map<String, Value>) -> Cel {
    let map: HashMap<Key, Cel> = object
        .iter()
        .map(|(k, v)| (Key::String(Arc::new(k.clone())), json_to_cel(v)))
        .collect();
    Cel::Map(CelMap { map: Arc::new(map) })
}

fn json_to_cel(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Cel::Int(i),
            (None, Some(u), _) => Cel::UInt(u),
            (None, None, Some(f)) => Cel::Float(f),
            (None, None, None) => Cel::Null,
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(object) => object_to_cel(object),
    }
}

fn cel_to_json(value: &Cel) -> Result<Value, String> {
    Ok(match value {
        Cel::Null => Value::Null,
        Cel::Bool(b) => Value::Bool(*b),
        Cel::Int(i) => Value::from(*i),
        Cel::UInt(u) => Value::from(*u),
        Cel::Float(f) => Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| format!("the result {f} is not a finite number, JSON cannot hold it"))?,
        Cel::String(s) => Value::String(s.to_string()),
        // Base64, as in CEL's own JSON mapping.
        Cel::Bytes(_) => value.json().map_err(|e| e.to_string())?,
        Cel::List(items) => Value::Array(items.iter().map(cel_to_json).collect::<Result<_, _>>()?),
        Cel::Map(map) => {
            // CEL maps are unordered; sorted keys make the output deterministic.
            let mut entries: Vec<(String, &Cel)> =
                map.map.iter().map(|(k, v)| (key_to_string(k), v)).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut object = Map::new();
            for (key, value) in entries {
                object.insert(key, cel_to_json(value)?);
            }
            Value::Object(object)
        }
        Cel::Timestamp(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        Cel::Duration(d) => Value::String(format_duration(d)),
        other => return Err(format!("a {} result cannot be JSON", other.type_of())),
    })
}

fn key_to_string(key: &Key) -> String {
    match key {
        Key::String(s) => s.to_string(),
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
    }
}

/// CEL's (and protobuf JSON's) duration text: seconds with a fraction only when needed.
fn format_duration(d: &chrono::TimeDelta) -> String {
    let sign = if *d < chrono::TimeDelta::zero() {
        "-"
    } else {
        ""
    };
    let d = d.abs();
    let (secs, nanos) = (d.num_seconds(), d.subsec_nanos());
    if nanos == 0 {
        format!("{sign}{secs}s")
    } else {
        let fraction = format!("{nanos:09}");
        format!("{sign}{secs}.{}s", fraction.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fixture {
        vars: Map<String, Value>,
        steps: Map<String, Value>,
        instance: Value,
    }

    impl Fixture {
        fn new() -> Self {
            let object = |v: Value| v.as_object().cloned().unwrap_or_default();
            Fixture {
                vars: object(json!({"n": 0, "name": "ada", "big": u64::MAX, "x": 1.5})),
                steps: object(json!({"x": {"status": 200, "body": {"ok": true}}})),
                instance: json!({"id": "0191", "workflow": "w", "version": 1}),
            }
        }

        fn scope(&self) -> Scope<'_> {
            Scope {
                vars: &self.vars,
                steps: &self.steps,
                instance: &self.instance,
                output: None,
            }
        }
    }

    fn eval(source: &str) -> Result<Value, ExprError> {
        Expr::compile(source).and_then(|e| e.eval(&Fixture::new().scope()))
    }

    #[test]
    fn json_integers_are_cel_ints() {
        assert_eq!(eval("vars.n + 1").ok(), Some(json!(1)));
        assert_eq!(eval("vars.n < 10").ok(), Some(json!(true)));
        assert_eq!(eval("vars.big").ok(), Some(json!(u64::MAX)));
        assert_eq!(eval("vars.x * 2.0").ok(), Some(json!(3.0)));
    }

    #[test]
    fn strings_concatenate() {
        assert_eq!(eval("'hi ' + vars.name").ok(), Some(json!("hi ada")));
    }

    #[test]
    fn instance_and_step_outputs_are_visible() {
        assert_eq!(eval("instance.id").ok(), Some(json!("0191")));
        assert_eq!(eval("steps.x.status == 200").ok(), Some(json!(true)));
        assert_eq!(eval("steps.x.body.ok").ok(), Some(json!(true)));
    }

    #[test]
    fn has_tests_for_presence() {
        assert_eq!(eval("has(vars.n)").ok(), Some(json!(true)));
        assert_eq!(eval("has(vars.missing)").ok(), Some(json!(false)));
    }

    #[test]
    fn compound_results_come_back_as_json() {
        assert_eq!(
            eval("{'b': [1, 'two', null], 'a': vars.n}").ok(),
            Some(json!({"a": 0, "b": [1, "two", null]}))
        );
        assert_eq!(
            eval("duration('90s') + duration('500ms')").ok(),
            Some(json!("90.5s"))
        );
        assert_eq!(
            eval("timestamp('2024-01-02T03:04:05Z')").ok(),
            Some(json!("2024-01-02T03:04:05Z"))
        );
    }

    #[test]
    fn a_missing_key_is_an_error_naming_the_expression() {
        let err = eval("vars.nope + 1").err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("`vars.nope + 1`") && e.contains("nope")),
            "{err:?}"
        );
    }

    #[test]
    fn a_type_error_is_an_error() {
        assert!(eval("vars.name + 1").is_err());
        assert!(eval("1 / 0").is_err());
    }

    #[test]
    fn output_is_only_in_scope_when_given() {
        let fixture = Fixture::new();
        let expr = Expr::compile("output.status == 201");
        let output = json!({"status": 201});
        let with_output = Scope {
            output: Some(&output),
            ..fixture.scope()
        };
        assert_eq!(
            expr.as_ref().ok().map(|e| e.eval_bool(&with_output).ok()),
            Some(Some(true))
        );
        assert!(expr.is_ok_and(|e| e.eval_bool(&fixture.scope()).is_err()));
    }

    #[test]
    fn when_must_be_a_bool_never_silently_false() {
        let fixture = Fixture::new();
        let eval_bool = |s: &str| Expr::compile(s).and_then(|e| e.eval_bool(&fixture.scope()));
        assert_eq!(eval_bool("vars.n == 0").ok(), Some(true));
        let err = eval_bool("vars.n").err();
        assert!(err.is_some_and(|e| e.message.contains("bool")));
        assert!(eval_bool("null").is_err());
    }

    #[test]
    fn invalid_and_oversized_sources_do_not_compile() {
        assert!(Expr::compile("vars.n +").is_err());
        assert!(Expr::compile("").is_err());
        let err = Expr::compile(&"1".repeat(MAX_EXPR_BYTES + 1)).err();
        assert!(err.is_some_and(|e| e.message.contains("64 KiB")));
    }

    #[test]
    fn deep_nesting_is_rejected_instead_of_overflowing_the_stack() {
        let n = MAX_EXPR_DEPTH + 1;
        for source in [
            format!("{}1{}", "(".repeat(n), ")".repeat(n)),
            format!("{}1{}", "[".repeat(n), "]".repeat(n)),
            format!("1{}", "+1".repeat(n)),
            format!("vars{}", ".a".repeat(n)),
        ] {
            let err = Expr::compile(&source).err();
            assert!(
                err.is_some_and(|e| e.message.contains("levels deep")),
                "{source}"
            );
        }
        let err = Expr::compile(&format!("1{}", "+1".repeat(MAX_EXPR_OPERATORS + 1))).err();
        assert!(err.is_some_and(|e| e.message.contains("operator")));
        let just_fits = format!("1{}", "+1".repeat(MAX_EXPR_DEPTH - 2));
        assert_eq!(eval(&just_fits).ok(), Some(json!(MAX_EXPR_DEPTH - 1)));
        let realistic = "has(vars.f) && vars.f.status == 200 ? vars.f.items.filter(i, \
            i.active && i.tags.exists(t, t == 'vip')).map(i, {'id': i.id}) : []";
        assert_eq!(eval(realistic).ok(), Some(json!([])));
    }

    #[test]
    fn eval_map_names_the_failing_key() {
        let fixture = Fixture::new();
        let entries: Vec<(String, Expr)> = [("a", "vars.n + 1"), ("b", "vars.nope")]
            .into_iter()
            .filter_map(|(k, s)| Some((k.to_owned(), Expr::compile(s).ok()?)))
            .collect();
        assert_eq!(
            eval_map(&entries[..1], &fixture.scope()).ok(),
            json!({"a": 1}).as_object().cloned()
        );
        assert_eq!(
            eval_map(&entries, &fixture.scope()).err().map(|(k, _)| k),
            Some("b".to_owned())
        );
    }

    fn undeclared(source: &str) -> Vec<String> {
        Expr::compile(source)
            .map(|e| e.undeclared())
            .unwrap_or_else(|e| vec![format!("does not compile: {e}")])
    }

    #[test]
    fn only_the_scope_types_and_macro_bindings_are_declared() {
        for source in [
            "vars.n + steps.x.status + size(instance.id)",
            "output.status == 200",
            "vars.items.all(x, x > 0) && vars.items.exists(y, y == vars.n)",
            "vars.items.exists_one(x, x == 1) || has(vars.n)",
            "vars.items.map(x, x * 2).filter(y, y > 2)",
            "vars.items.map(x, x > 1, x * 2)",
            "vars.items.map(x, vars.items.filter(y, y < x)).size()",
            "type(vars.n) == int && type(vars.name) == string && type(null) == null_type",
            "optional.of(1).hasValue() && optional.none().orValue(2) == 2",
            "duration('1s') < duration('2s') && timestamp('2024-01-01T00:00:00Z').getFullYear() == 2024",
            "int('1') + uint(1u) > 0u && double(1) == 1.0 && string(1) == '1'",
        ] {
            assert_eq!(undeclared(source), Vec::<String>::new(), "{source}");
        }
    }

    #[test]
    fn every_undeclared_name_is_reported_once() {
        assert_eq!(undeclared("foo + 1"), ["foo"]);
        assert_eq!(undeclared("vs.n == input.n && vs.m"), ["input", "vs"]);
        assert_eq!(undeclared("[x, {'k': y}, z.f]"), ["x", "y", "z"]);
        // A macro binds its variable only inside its own body.
        assert_eq!(undeclared("vars.l.all(x, x > 0) && x == 1"), ["x"]);
        assert_eq!(undeclared("vars.l.map(x, x + y)"), ["y"]);
        assert_eq!(undeclared("[x].all(x, x > 0)"), ["x"]);
        assert_eq!(undeclared("other.of(1)"), ["other"]);
        assert_eq!(
            undeclared("vars.l.all(optional, optional.of > 0)"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn output_is_detected_only_where_it_is_read_free() {
        let uses = |s: &str| Expr::compile(s).is_ok_and(|e| e.uses_output());
        assert!(uses("output.status == 200"));
        assert!(uses("vars.l.all(x, x == output)"));
        assert!(!uses("vars.l.all(output, output > 0)"));
        assert!(!uses("steps.output.ok"));
    }

    #[test]
    fn expressions_the_check_accepts_find_their_names_when_they_run() {
        let fixture = Fixture::new();
        for source in [
            "vars.n == 0 && type(vars.n) == int",
            "[1, 2].all(x, x > 0) && [1, 2].map(x, x * vars.n) == [0, 0]",
            "optional.of(1).hasValue()",
            "{'a': 1}.all(k, k == 'a')",
        ] {
            assert!(undeclared(source).is_empty(), "{source}");
            assert!(
                Expr::compile(source).is_ok_and(|e| e.eval_bool(&fixture.scope()) == Ok(true)),
                "{source}"
            );
        }
    }

    #[test]
    fn expressions_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync + Clone + fmt::Debug>() {}
        assert_send_sync::<Expr>();
    }
}
