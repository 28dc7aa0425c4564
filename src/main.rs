use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = reaper::cli::Cli::parse();
    reaper::cli::main(cli).await
}
