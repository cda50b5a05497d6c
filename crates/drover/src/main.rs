//! The stock `drover` binary: every role, no custom handlers. Build your own binary on the
//! `drover` library to register handlers.

fn main() -> std::process::ExitCode {
    drover::main(drover::Handlers::default())
}
