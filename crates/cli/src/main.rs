//! `stretch`: run a local cluster or one node, and manage volumes through a
//! node's admin API.

mod admin_client;
mod sim_command;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stretch_node::{ByteSize, ClusterConfig, CreateVolume};

use crate::admin_client::AdminClient;

#[derive(Debug, Parser)]
#[command(
    name = "stretch",
    version,
    about = "Multi-site block storage cache: stretched volumes served over NBD",
    long_about = "stretch serves virtual volumes to hypervisors over NBD. `stretch up` runs a \
                  local cluster; `stretch volume ...` and `stretch status` talk to a running \
                  node's admin API."
)]
struct Cli {
    /// Admin API of the node to talk to.
    #[arg(
        long,
        global = true,
        env = "STRETCH_ADMIN",
        default_value = "http://127.0.0.1:9180"
    )]
    admin: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every node of a cluster config in this process until Ctrl-C.
    Up {
        /// Cluster config (TOML); the embedded single-site config if absent.
        config: Option<PathBuf>,
        /// Where nodes keep journals, legs and catalogs (one folder each).
        #[arg(long, default_value = "stretch-data")]
        data_dir: PathBuf,
    },
    /// Run one node of a cluster config until Ctrl-C.
    Node {
        /// Cluster config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Which [[node]] of the config to run.
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "stretch-data")]
        data_dir: PathBuf,
    },
    /// Create the cluster CA and a certificate for every node of a config
    /// (only what is missing; existing keys are never replaced).
    Init {
        /// Cluster config (TOML); the embedded single-site config if absent.
        config: Option<PathBuf>,
        /// Where the CA and node certificates go.
        #[arg(long, default_value = "stretch-data/pki")]
        dir: PathBuf,
    },
    /// Create, list, show and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show the node's state: volumes, dirty data, journal, failures.
    Status,
    /// Run the deterministic simulator: the real core under seeded faults,
    /// checked against a reference model. Exits 1 on a violation.
    Sim(sim_command::SimArgs),
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume (usable at once; never-written blocks read as zeros).
    Create {
        name: String,
        /// Size with K/M/G/T suffix (powers of 1024), a multiple of 4K.
        #[arg(long)]
        size: ByteSize,
        /// Consistency group: volumes whose writes are ordered together
        /// (default: a group of its own, named after the volume).
        #[arg(long)]
        group: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Delete a volume and its leg. Refused while requests are in flight.
    Delete { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stretch: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the
/// message already quotes (typed errors often embed their source).
fn one_line(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up { config, data_dir } => {
            let config = match config {
                Some(path) => ClusterConfig::load(&path)?,
                None => ClusterConfig::embedded_default(),
            };
            serve(data_dir, move |data_dir, shutdown| async move {
                stretch_node::run_cluster(&config, &data_dir, shutdown).await
            })
        }
        Command::Node {
            config,
            node,
            data_dir,
        } => {
            let config = ClusterConfig::load(&config)?;
            if config.node(&node).is_none() {
                anyhow::bail!("node {node:?} is not in the config");
            }
            serve(data_dir, move |data_dir, shutdown| async move {
                stretch_node::run_node(&config, &node, &data_dir, shutdown).await
            })
        }
        Command::Init { config, dir } => {
            let config = match config {
                Some(path) => ClusterConfig::load(&path)?,
                None => ClusterConfig::embedded_default(),
            };
            let nodes: Vec<&str> = config.nodes.iter().map(|node| node.name.as_str()).collect();
            let report = stretch_transport::init(&dir, &config.cluster.name, &nodes)?;
            let ca = if report.ca_created { "created" } else { "kept" };
            println!("cluster CA {ca} in {}", dir.display());
            for node in &report.nodes_created {
                println!("certificate created for node {node}");
            }
            for node in &report.nodes_kept {
                println!("certificate kept for node {node}");
            }
            Ok(())
        }
        Command::Volume(command) => volume(&AdminClient::new(&cli.admin), command),
        Command::Status => status(&AdminClient::new(&cli.admin)),
        Command::Sim(args) => sim_command::run(args),
    }
}

/// Starts logging and the runtime, then runs until Ctrl-C or SIGTERM.
fn serve<F, Fut>(data_dir: PathBuf, run: F) -> anyhow::Result<()>
where
    F: FnOnce(PathBuf, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), stretch_node::NodeError>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = Box::pin(async {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::warn!(%error, "cannot watch SIGTERM; use Ctrl-C");
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("shutting down: finishing requests in flight, draining to the legs");
        });
        run(data_dir, shutdown).await
    })?;
    Ok(())
}

fn volume(client: &AdminClient, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create { name, size, group } => {
            let volume = client.create_volume(&CreateVolume {
                name,
                size: size.0,
                group,
            })?;
            println!(
                "created volume {} ({}), export {}",
                volume.name,
                ByteSize(volume.size),
                volume.export
            );
        }
        VolumeCommand::List => {
            let volumes = client.volumes()?;
            println!("{:<24} {:>10} {:<16} EXPORT", "NAME", "SIZE", "GROUP");
            for volume in volumes {
                println!(
                    "{:<24} {:>10} {:<16} {}",
                    volume.name,
                    ByteSize(volume.size).to_string(),
                    volume.group,
                    volume.export
                );
            }
        }
        VolumeCommand::Show { name } => {
            let volume = client.volume(&name)?;
            println!("name:   {}", volume.name);
            println!("id:     {}", volume.id);
            println!("size:   {} ({} bytes)", ByteSize(volume.size), volume.size);
            println!("group:  {}", volume.group);
            println!("leg:    {}", volume.leg);
            println!("export: {}", volume.export);
        }
        VolumeCommand::Delete { name } => {
            let volume = client.delete_volume(&name)?;
            println!("deleted volume {}", volume.name);
        }
    }
    Ok(())
}

fn status(client: &AdminClient) -> anyhow::Result<()> {
    let status = client.status()?;
    println!("cluster:          {}", status.cluster);
    println!("node:             {} (site {})", status.node, status.site);
    match status.nbd {
        Some(nbd) => println!("nbd:              {nbd}"),
        None => println!("nbd:              none (witness site, holds no volumes)"),
    }
    println!("uptime:           {} s", status.uptime_seconds);
    println!("volumes:          {}", status.volumes);
    println!(
        "cache:            {} dirty + {} clean of {} bytes",
        status.dirty_bytes, status.cache_clean_bytes, status.cache_bytes_max
    );
    println!(
        "deltas:           {} open, {} journaled but not on the leg",
        status.open_deltas, status.unapplied_deltas
    );
    println!(
        "journal:          {} bytes awaiting release",
        status.journal_bytes
    );
    println!("throttled writes: {}", status.throttled_writes);
    match status.failure {
        Some(reason) => println!("state:            FAILED, not taking writes: {reason}"),
        None => println!("state:            ok"),
    }
    Ok(())
}
