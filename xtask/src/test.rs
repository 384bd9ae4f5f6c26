//! `cargo xtask test`: the whole test suite, on a machine prepared for it.

use std::{env, process::ExitCode};

use anyhow::{Context as _, bail};

use crate::setup::{self, NotRoot};

/// Run the tests: installs what they need, builds kgate, runs `cargo test`.
///
/// Arguments go to `cargo test`; those after a second `--` go to the test binaries.
/// Tests run two at a time unless you pass `--test-threads` (or set RUST_TEST_THREADS).
/// With CI=true, `cargo fmt --check` and `cargo clippy` run first.
///
/// Example: cargo xtask test
///
/// Example: cargo xtask test -- -p tests splice -- --nocapture
#[derive(clap::Args)]
pub struct Options {
    /// Passed to `cargo test`
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CARGO_TEST_ARGS"
    )]
    pub args: Vec<String>,
}

const DEFAULT_TEST_THREADS: &str = "--test-threads=2";

pub fn run(options: Options) -> anyhow::Result<ExitCode> {
    let env = setup::toolchain()?;
    setup::debian_packages(NotRoot::Skip)?;
    // tests/tests/packaging.rs builds the Debian package.
    setup::cargo_deb(&env)?;

    if setup::is_ci() {
        setup::lint_components(&env)?;
        setup::run(env.cargo().args(["fmt", "--all", "--check"]))
            .context("the code is not formatted: run `cargo fmt --all` and commit the result")?;
        setup::run(
            env.cargo()
                .args(["clippy", "--all-targets", "--", "-D", "warnings"]),
        )
        .context("clippy found problems (above): fix them, then rerun")?;
    }

    setup::run(env.cargo().args(["build", "--package", "proxy-user"]))
        .context("building kgate failed; see the compiler output above")?;
    let kgate = env.target_dir.join("debug/kgate");
    if !kgate.is_file() {
        bail!("cargo built proxy-user but {} is missing", kgate.display());
    }

    let (cargo_args, test_args) = split_args(options.args);
    let mut cargo = env.cargo();
    cargo
        .arg("test")
        .args(cargo_args)
        .arg("--")
        .args(test_args)
        .env("KGATE_BIN", &kgate);
    if env::var_os("RUST_BACKTRACE").is_none() {
        cargo.env("RUST_BACKTRACE", "1");
    }
    let status = setup::status(&mut cargo)?;
    if status.success() {
        println!("test: all passed");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("test: cargo test failed ({status})");
    Ok(ExitCode::from(
        status.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)),
    ))
}

/// Splits at the first `--` into cargo's arguments and the test binaries', adding
/// the default thread count unless the caller chose one.
fn split_args(mut args: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut test_args = match args.iter().position(|a| a == "--") {
        Some(i) => {
            let rest = args.split_off(i);
            rest[1..].to_vec()
        }
        None => Vec::new(),
    };
    let threads_chosen = test_args.iter().any(|a| a.starts_with("--test-threads"))
        || env::var_os("RUST_TEST_THREADS").is_some();
    if !threads_chosen {
        test_args.push(DEFAULT_TEST_THREADS.to_owned());
    }
    (args, test_args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_before_the_separator_go_to_cargo_and_after_it_to_the_tests() {
        let (cargo, tests) = split_args(strings(&["-p", "tests", "--", "--nocapture"]));
        assert_eq!(cargo, strings(&["-p", "tests"]));
        assert_eq!(tests[0], "--nocapture");
    }

    #[test]
    fn a_thread_count_from_the_caller_replaces_the_default() {
        let (_, tests) = split_args(strings(&["--", "--test-threads", "8"]));
        assert!(!tests.contains(&DEFAULT_TEST_THREADS.to_owned()));
    }
}
