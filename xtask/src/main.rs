//! kgate's tasks: `cargo xtask build-ebpf | build | test | demo | deb | bench`.
//!
//! Every command installs what it needs first (see `setup`), so on a fresh machine
//! `cargo xtask test` or `cargo xtask demo` is the only command to type. This crate
//! must not depend on proxy-user: it has to build before bpf-linker exists.

mod bench;
mod build;
mod build_ebpf;
mod deb;
mod demo;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test, demo and package kgate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    BuildEbpf(build_ebpf::Options),
    Build(build::Options),
    Test(test::Options),
    Demo(demo::Options),
    Deb(deb::Options),
    Bench(bench::Options),
}

/// Prints an error as its message and causes, one a line: what to do comes first.
/// (Not `main() -> Result`: with RUST_BACKTRACE set, as in CI, that adds a backtrace
/// of xtask itself, which only buries the message.)
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::BuildEbpf(options) => build_ebpf::run(options),
        Command::Build(options) => build::run(options),
        Command::Test(options) => test::run(options),
        Command::Demo(options) => demo::run(options),
        Command::Deb(options) => deb::run(options),
        Command::Bench(options) => bench::run(options),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Test(options) => options.args,
            _ => panic!("not the test command"),
        }
    }

    #[test]
    fn test_passes_cargo_and_test_binary_arguments_through_in_order() {
        let want = ["-p", "tests", "splice", "--", "--nocapture"];
        let with_separator = [
            "xtask",
            "test",
            "--",
            "-p",
            "tests",
            "splice",
            "--",
            "--nocapture",
        ];
        assert_eq!(test_args(&with_separator), want);
        assert_eq!(
            test_args(&[
                "xtask",
                "test",
                "-p",
                "tests",
                "splice",
                "--",
                "--nocapture"
            ]),
            want
        );
        assert!(test_args(&["xtask", "test"]).is_empty());
    }
}
