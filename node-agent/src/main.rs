//! `node-agent`: see [`berth_node_agent::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = berth_node_agent::cli::Args::parse();
    // oci-client's rustls (registry copies) has no default crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(berth_node_agent::cli::main(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
