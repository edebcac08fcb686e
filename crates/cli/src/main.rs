//! `stretch`: run a local cluster or one node, and manage volumes through a
//! node's admin API.

mod admin_client;
mod migrate_command;
mod sim_command;
mod sim_control_command;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Parser, Subcommand};
use stretch_node::{ByteSize, ClusterConfig, CreateVolume, LinkInfo, LinkPair, SetLink};

use crate::admin_client::{AdminClient, Credentials};

/// Where `stretch up` and `stretch node` keep their data by default; the
/// PKI directory (and with it the admin token) is `pki` inside.
const DEFAULT_DATA_DIR: &str = "stretch-data";

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

    /// File holding the admin token, sent with every request; changes
    /// (create, delete, move, link changes) need it. `stretch init` and
    /// `stretch up` create it as admin.token in the PKI directory
    /// [default: stretch-data/pki/admin.token, if it exists]
    #[arg(long, global = true, env = "STRETCH_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every node of a cluster config in this process until Ctrl-C.
    Up {
        /// Cluster config (TOML); if absent, the embedded local config:
        /// sites a and b 25 ms apart (one way) plus a witness w, on
        /// loopback (cluster-configs/local.toml).
        config: Option<PathBuf>,
        /// Where nodes keep journals, legs and catalogs (one folder each).
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The cluster CA, node certificates and admin token; created on
        /// first start if missing (default: DATA_DIR/pki).
        #[arg(long)]
        pki_dir: Option<PathBuf>,
    },
    /// Run one node of a cluster config until Ctrl-C.
    Node {
        /// Cluster config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Which [[node]] of the config to run.
        #[arg(long)]
        node: String,
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The cluster CA, node certificates and admin token made by
        /// `stretch init` (default: DATA_DIR/pki). Without the token the
        /// node refuses every change, and will not listen beyond loopback.
        #[arg(long)]
        pki_dir: Option<PathBuf>,
    },
    /// Create the cluster CA, a certificate for every node of a config and
    /// the admin token (only what is missing; existing keys and tokens are
    /// never replaced). The directory holds the CA key: give each node only
    /// its own files (`stretch cert export`).
    Init {
        /// Cluster config (TOML); the embedded local config if absent.
        config: Option<PathBuf>,
        /// Where the CA, node certificates and admin token go.
        #[arg(long, default_value = "stretch-data/pki")]
        dir: PathBuf,
        /// Lifetime of new node certificates, in days.
        #[arg(long, default_value_t = stretch_transport::NODE_DAYS_DEFAULT)]
        cert_days: u32,
        /// Lifetime of a new cluster CA, in days.
        #[arg(long, default_value_t = stretch_transport::CA_DAYS_DEFAULT)]
        ca_days: u32,
    },
    /// Renew node certificates and give a node the files it needs.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Create, list, show and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// List and cancel live migrations (`stretch volume migrate` starts
    /// one).
    #[command(subcommand)]
    Migration(migrate_command::MigrationCommand),
    /// Show the node's state: volumes, dirty data, journal, failures.
    Status,
    /// Shape, cut and heal the links between sites (the built-in link
    /// shaper), live.
    #[command(subcommand, long_about = LINK_ABOUT)]
    Link(LinkCommand),
    /// Run the deterministic simulator: the real core under seeded faults,
    /// checked against a reference model. Exits 1 on a violation.
    Sim(sim_command::SimArgs),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Re-issue node certificates with the existing CA key (each node keeps
    /// its key); a node uses its new certificate from its next start.
    Renew {
        /// The node to renew; repeat for several (default: every node
        /// certificate in the directory).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// The PKI directory `stretch init` made (it holds the CA key).
        #[arg(long, default_value = "stretch-data/pki")]
        dir: PathBuf,
        /// Lifetime of the new certificates, in days (never past the CA's).
        #[arg(long, default_value_t = stretch_transport::NODE_DAYS_DEFAULT)]
        cert_days: u32,
    },
    /// Copy what one node needs (ca.pem, NODE.pem, NODE.key) into a
    /// directory of its own, without the CA key; run again after a renewal.
    Export {
        /// The node whose files to copy.
        #[arg(long)]
        node: String,
        /// The node's PKI directory (its `stretch node --pki-dir`).
        #[arg(long)]
        out: PathBuf,
        /// The PKI directory `stretch init` made.
        #[arg(long, default_value = "stretch-data/pki")]
        dir: PathBuf,
    },
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
        /// The site that accepts its writes (default: the site of the node
        /// asked). Every volume of a group has the same owner.
        #[arg(long)]
        owner: Option<String>,
        /// async: FLUSH durable at the owner; flush-sync: FLUSH also waits
        /// for another site's journal; sync: every write does.
        #[arg(long, default_value = "async", value_parser = ["async", "flush-sync", "sync"])]
        mode: String,
        /// What happens when the owner site is lost (holds no lease from a
        /// majority of the voters): auto: another site takes the volume
        /// over within about 3 s, losing the writes it had not received
        /// (none in sync mode); manual: the volume stays suspended until
        /// `stretch volume promote`.
        #[arg(long, default_value = "manual", value_parser = ["auto", "manual"])]
        failover: String,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Delete a volume and its leg. Refused while requests are in flight.
    Delete { name: String },
    /// Move the ownership of a volume (and the rest of its group) to
    /// another site. Ask the owner's node (--admin). Writes pause while the
    /// new owner catches up (at most 30 s), then go to it; both sites must
    /// be connected.
    Move {
        name: String,
        /// The site that takes over.
        #[arg(long)]
        to: String,
    },
    /// Live-migrate a volume's consistency group (or `--group`) to another
    /// site while it is written: the target catches up in the background,
    /// then writes pause briefly while ownership moves (--mode drain); or
    /// ownership moves at once and the target copies what it lacks after
    /// (--mode fast). Ask the owner's node (--admin). Shows progress until
    /// the move (and a fast move's copy) ends; gives up, with the reason,
    /// if the switchover does not come within --timeout.
    Migrate(migrate_command::MigrateArgs),
    /// Set whether the ownership of a volume's consistency group follows
    /// its workload. With auto, once a site other than the owner brings
    /// most of the group's requests (80 % for a minute by default:
    /// tuning.follow_*), the owner migrates the group there (drain mode;
    /// `stretch migration list` shows it), at most once in ten minutes.
    /// Off by default.
    Follow {
        name: String,
        #[arg(value_parser = ["auto", "off"])]
        policy: String,
    },
    /// Fail a volume's group over to SITE while its owner site is lost,
    /// accepting the loss of the writes the owner acknowledged that SITE
    /// had not received. Ask a node at SITE (--admin). Waits until the old
    /// owner's lease cannot cover the volume (about 2 s), then SITE serves
    /// writes. When the old owner returns it counts what it lost and is
    /// resynced from SITE.
    Promote {
        name: String,
        /// The site that takes over (the site of the node asked).
        #[arg(long)]
        site: String,
        /// Required: the operator accepts that writes are lost.
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// End a fast migration's copy of NAME's group without the regions its
    /// source never sent: the source is lost, and requests touching those
    /// regions wait (then fail) until it returns. The new owner's older
    /// image of them stands, and is written again so the source converges
    /// on it if it ever returns. Ask a node of the new owner's site
    /// (--admin).
    AcceptLoss {
        name: String,
        /// Required: the operator accepts that writes are lost.
        #[arg(long)]
        accept_data_loss: bool,
    },
}

const LINK_ABOUT: &str = "Shape, cut and heal the links between sites (the built-in link \
    shaper), live. A link joins two sites and applies in both directions; the change takes \
    effect at once and lasts until the node stops (the cluster config's [[link]] tables are \
    the shape at start).\n\n\
    Each node shapes only the datagrams it sends. Under `stretch up` every node runs in one \
    process and shares one set of links, so telling one node (--admin) is enough. When nodes \
    run as separate `stretch node` processes, EVERY node must be told: give --config CONFIG \
    to send the change to the admin API of every node of that config, or run the command \
    once per node with --admin. A node never forwards a change to others.";

#[derive(Debug, Subcommand)]
enum LinkCommand {
    /// Change the shape of the link between sites A and B (both
    /// directions); settings not given keep their value, a cut link stays
    /// cut.
    #[command(group(ArgGroup::new("change").required(true).multiple(true)))]
    Set {
        /// One site of the link.
        a: String,
        /// The other site.
        b: String,
        /// One-way delay in milliseconds (the round trip is twice this).
        #[arg(long, group = "change")]
        delay_ms: Option<u64>,
        /// Extra one-way delay per datagram, uniform in 0..=N milliseconds.
        #[arg(long, group = "change")]
        jitter_ms: Option<u64>,
        /// Bandwidth limit in Mbit/s, each direction; 0 removes the limit.
        #[arg(long, group = "change", allow_negative_numbers = true)]
        bandwidth_mbit: Option<f64>,
        /// Datagrams lost at random, in percent (0 to 100).
        #[arg(long, group = "change", allow_negative_numbers = true)]
        loss_pct: Option<f64>,
        #[command(flatten)]
        targets: LinkTargets,
    },
    /// Cut the link between sites A and B: nothing gets through either way
    /// until it is healed.
    Cut {
        /// One site of the link.
        a: String,
        /// The other site.
        b: String,
        #[command(flatten)]
        targets: LinkTargets,
    },
    /// Restore a cut link between sites A and B, with the shape it had.
    Heal {
        /// One site of the link.
        a: String,
        /// The other site.
        b: String,
        #[command(flatten)]
        targets: LinkTargets,
    },
    /// Show every pair of sites as the node shapes it now.
    List {
        #[command(flatten)]
        targets: LinkTargets,
    },
}

#[derive(Debug, clap::Args)]
struct LinkTargets {
    /// Talk to every node of this cluster config (each node's
    /// admin_listen) instead of --admin only: needed when nodes run as
    /// separate `stretch node` processes.
    #[arg(long, value_name = "CONFIG")]
    config: Option<PathBuf>,
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
        Command::Up {
            config,
            data_dir,
            pki_dir,
        } => {
            let config = match config {
                Some(path) => ClusterConfig::load(&path)?,
                None => ClusterConfig::embedded_default(),
            };
            let pki_dir = pki_dir.unwrap_or_else(|| data_dir.join("pki"));
            serve(data_dir, move |data_dir, shutdown| async move {
                stretch_node::run_cluster(&config, &data_dir, &pki_dir, shutdown).await
            })
        }
        Command::Node {
            config,
            node,
            data_dir,
            pki_dir,
        } => {
            let config = ClusterConfig::load(&config)?;
            if config.node(&node).is_none() {
                anyhow::bail!("node {node:?} is not in the config");
            }
            let options = stretch_node::NodeOptions {
                pki_dir: pki_dir.unwrap_or_else(|| data_dir.join("pki")),
                links: None,
                shutdown_barrier: None,
            };
            serve(data_dir, move |data_dir, shutdown| async move {
                stretch_node::run_node(&config, &node, &data_dir, options, shutdown).await
            })
        }
        Command::Init {
            config,
            dir,
            cert_days,
            ca_days,
        } => {
            let config = match config {
                Some(path) => ClusterConfig::load(&path)?,
                None => ClusterConfig::embedded_default(),
            };
            let nodes: Vec<&str> = config.nodes.iter().map(|node| node.name.as_str()).collect();
            let lifetimes = stretch_transport::Lifetimes {
                ca_days,
                node_days: cert_days,
            };
            let report =
                stretch_transport::init_with(&dir, &config.cluster.name, &nodes, lifetimes)?;
            let ca = if report.ca_created { "created" } else { "kept" };
            println!("cluster CA {ca} in {}", dir.display());
            for node in &report.nodes_created {
                println!("certificate created for node {node}");
            }
            for node in &report.nodes_kept {
                println!("certificate kept for node {node}");
            }
            let token = dir.join(stretch_node::ADMIN_TOKEN_FILE);
            if stretch_node::ensure_admin_token(&dir)? {
                println!("admin token created in {}", token.display());
            } else {
                println!("admin token kept in {}", token.display());
            }
            Ok(())
        }
        Command::Cert(command) => cert(command),
        Command::Volume(command) => volume(
            &AdminClient::new(&cli.admin, &credentials(cli.token_file.as_deref())?),
            command,
        ),
        Command::Migration(command) => migrate_command::migration(
            &AdminClient::new(&cli.admin, &credentials(cli.token_file.as_deref())?),
            command,
        ),
        Command::Status => status(&AdminClient::new(
            &cli.admin,
            &credentials(cli.token_file.as_deref())?,
        )),
        Command::Link(command) => link(
            &cli.admin,
            &credentials(cli.token_file.as_deref())?,
            command,
        ),
        Command::Sim(args) => sim_command::run(args),
    }
}

fn cert(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Renew {
            nodes,
            dir,
            cert_days,
        } => {
            let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let renewed = stretch_transport::renew(&dir, &names, cert_days)?;
            if renewed.is_empty() {
                anyhow::bail!("no node certificates in {}", dir.display());
            }
            for certificate in &renewed {
                println!(
                    "certificate renewed for node {}, valid until {}",
                    certificate.node,
                    date(certificate.not_after)
                );
            }
            println!(
                "copy each node's new certificate to it (`stretch cert export`) and restart it"
            );
            Ok(())
        }
        CertCommand::Export { node, out, dir } => {
            stretch_transport::export(&dir, &node, &out)?;
            println!(
                "{} holds ca.pem, {node}.pem and {node}.key (no CA key): run the node with \
                 --pki-dir {}",
                out.display(),
                out.display()
            );
            Ok(())
        }
    }
}

/// A time as an RFC 3339 date in UTC.
fn date(at: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{at:?}"))
}

/// The admin token to send: `--token-file`, `STRETCH_TOKEN_FILE`, or the
/// one `stretch up` creates with its default directories.
fn credentials(token_file: Option<&Path>) -> anyhow::Result<Credentials> {
    let default = Path::new(DEFAULT_DATA_DIR)
        .join("pki")
        .join(stretch_node::ADMIN_TOKEN_FILE);
    Credentials::load(token_file, &default)
}

/// Starts logging and the runtime, then runs until Ctrl-C or SIGTERM.
fn serve<F, Fut>(data_dir: PathBuf, run: F) -> anyhow::Result<()>
where
    F: FnOnce(PathBuf, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), stretch_node::NodeError>>,
{
    // openraft logs every election step at info and every missed heartbeat
    // (ten a second per unreachable voter) at warn; stretch logs what an
    // operator needs of it (leader changes, lost majority) itself. Asking
    // for openraft in RUST_LOG brings its logs back.
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !asked.contains("openraft") {
        filter = filter.add_directive(
            "openraft=error"
                .parse()
                .expect("logging invariant: a constant directive parses"),
        );
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        VolumeCommand::Create {
            name,
            size,
            group,
            owner,
            mode,
            failover,
        } => {
            let volume = client.create_volume(&CreateVolume {
                name,
                size: size.0,
                group,
                owner,
                mode: Some(mode),
                failover: Some(failover),
            })?;
            println!(
                "created volume {} ({}, {} mode, {} failover, owned by site {}), export {}",
                volume.name,
                ByteSize(volume.size),
                volume.mode,
                volume.failover,
                volume.owner,
                volume.export
            );
            if !volume.unconfirmed_sites.is_empty() {
                println!(
                    "sites not reached yet (they create it when they reconnect): {}",
                    volume.unconfirmed_sites.join(", ")
                );
            }
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
            println!("owner:  site {} (epoch {})", volume.owner, volume.epoch);
            println!("mode:   {}", volume.mode);
            println!("failover: {}", volume.failover);
            println!("follow: {}", volume.follow);
            let requests: u64 = volume.requests_by_site.values().sum();
            if requests > 0 {
                let shares: Vec<String> = volume
                    .requests_by_site
                    .iter()
                    .map(|(site, count)| format!("{site} {}%", count * 100 / requests))
                    .collect();
                println!(
                    "requests: {requests} since this owner took the group ({})",
                    shares.join(", ")
                );
            }
            let leases = volume.read_leases;
            let strict = leases.local_strict_reads + leases.owner_strict_reads;
            if strict > 0 {
                println!(
                    "strict reads here: {strict} ({} served locally under read leases, {} asked the owner)",
                    leases.local_strict_reads, leases.owner_strict_reads
                );
            }
            if leases.revocations > 0 || leases.writes_waited > 0 {
                println!(
                    "read leases revoked for writes: {} ({} writes waited, {} ms in all)",
                    leases.revocations, leases.writes_waited, leases.write_wait_ms
                );
            }
            if let Some(reason) = &volume.suspended {
                println!("SUSPENDED: {reason}");
            }
            if let Some(failover) = &volume.last_failover {
                println!(
                    "last failover: {} -> {} at epoch {} ({}), image after delta {}",
                    failover.from,
                    failover.to,
                    failover.epoch,
                    if failover.automatic {
                        "auto"
                    } else {
                        "promoted"
                    },
                    failover.after_delta
                );
            }
            for replica in &volume.replicas {
                println!(
                    "site {}: {} deltas ({} bytes) not applied, lag {:.3} s, {} regions to resync",
                    replica.site,
                    replica.unapplied_deltas,
                    replica.unapplied_bytes,
                    replica.lag_seconds,
                    replica.resync_regions_left
                );
            }
        }
        VolumeCommand::Move { name, to } => {
            let volume = client.move_volume(&name, &to)?;
            println!(
                "volume {} is now owned by site {} (epoch raised)",
                volume.name, volume.owner
            );
        }
        VolumeCommand::Migrate(args) => migrate_command::migrate(client, args)?,
        VolumeCommand::Follow { name, policy } => {
            let volume = client.follow_volume(&name, &policy)?;
            match volume.follow.as_str() {
                "auto" => println!(
                    "the ownership of group {} (volume {}) follows its workload",
                    volume.group, volume.name
                ),
                _ => println!(
                    "the ownership of group {} (volume {}) stays where it is put",
                    volume.group, volume.name
                ),
            }
        }
        VolumeCommand::Promote {
            name,
            site,
            accept_data_loss,
        } => {
            if !accept_data_loss {
                anyhow::bail!(
                    "promoting {name} loses the writes its owner acknowledged that site {site} had not received: \
                     add --accept-data-loss to go ahead"
                );
            }
            let volume = client.promote_volume(&name, &site)?;
            println!(
                "volume {} is now owned by site {} (epoch {}); writes the old owner acknowledged after delta {} are lost",
                volume.name,
                volume.owner,
                volume.epoch,
                volume
                    .last_failover
                    .as_ref()
                    .map_or(0, |failover| failover.after_delta)
            );
        }
        VolumeCommand::AcceptLoss {
            name,
            accept_data_loss,
        } => {
            if !accept_data_loss {
                anyhow::bail!(
                    "ending the copy of {name}'s group loses the writes its old owner acknowledged in the regions not copied yet: \
                     add --accept-data-loss to go ahead"
                );
            }
            let accepted = client.accept_loss(&name)?;
            println!(
                "the copy of volume {}'s group ended: {} regions ({}) were never copied and keep this site's older image",
                accepted.volume,
                accepted.regions_not_copied,
                format_args!(
                    "{:.1} MiB",
                    (accepted.regions_not_copied * accepted.region_bytes) as f64
                        / f64::from(1 << 20)
                ),
            );
        }
        VolumeCommand::Delete { name } => {
            let volume = client.delete_volume(&name)?;
            println!("deleted volume {}", volume.name);
        }
    }
    Ok(())
}

/// The admin APIs a link command talks to: `--admin`, or every node of
/// `--config`, each with a label for its output lines.
fn link_endpoints(admin: &str, targets: &LinkTargets) -> anyhow::Result<Vec<(String, String)>> {
    match &targets.config {
        None => Ok(vec![(admin.to_string(), admin.to_string())]),
        Some(path) => {
            let config = ClusterConfig::load(path)?;
            Ok(config
                .nodes
                .iter()
                .map(|node| (node.name.clone(), format!("http://{}", node.admin_listen)))
                .collect())
        }
    }
}

/// A change to one link, sent to one or more nodes.
enum LinkAction {
    Set(SetLink),
    Cut(LinkPair),
    Heal(LinkPair),
}

impl LinkAction {
    fn send(&self, client: &AdminClient) -> anyhow::Result<LinkInfo> {
        match self {
            LinkAction::Set(request) => client.set_link(request),
            LinkAction::Cut(pair) => client.cut_link(pair),
            LinkAction::Heal(pair) => client.heal_link(pair),
        }
    }
}

fn link(admin: &str, credentials: &Credentials, command: LinkCommand) -> anyhow::Result<()> {
    let (targets, action) = match command {
        LinkCommand::List { targets } => return link_list(admin, credentials, &targets),
        LinkCommand::Set {
            a,
            b,
            delay_ms,
            jitter_ms,
            bandwidth_mbit,
            loss_pct,
            targets,
        } => (
            targets,
            LinkAction::Set(SetLink {
                a,
                b,
                delay_ms,
                jitter_ms,
                bandwidth_mbit,
                loss_pct,
            }),
        ),
        LinkCommand::Cut { a, b, targets } => (targets, LinkAction::Cut(LinkPair { a, b })),
        LinkCommand::Heal { a, b, targets } => (targets, LinkAction::Heal(LinkPair { a, b })),
    };
    let endpoints = link_endpoints(admin, &targets)?;
    if let [(_, url)] = endpoints.as_slice() {
        println!("{}", action.send(&AdminClient::new(url, credentials))?);
        return Ok(());
    }
    let mut failed = 0;
    for (node, url) in &endpoints {
        match action.send(&AdminClient::new(url, credentials)) {
            Ok(info) => println!("{node}: {info}"),
            Err(error) => {
                failed += 1;
                eprintln!("stretch: node {node} ({url}): {}", one_line(&error));
            }
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "the change reached {} of {} nodes",
            endpoints.len() - failed,
            endpoints.len()
        );
    }
    Ok(())
}

fn link_list(admin: &str, credentials: &Credentials, targets: &LinkTargets) -> anyhow::Result<()> {
    let endpoints = link_endpoints(admin, targets)?;
    let several = endpoints.len() > 1;
    for (node, url) in &endpoints {
        let links = AdminClient::new(url, credentials)
            .links()
            .with_context(|| format!("node {node}"))?;
        if several {
            println!("node {node}:");
        }
        if links.is_empty() {
            println!("no links: the cluster has one site");
            continue;
        }
        println!(
            "{:<16} {:>9} {:>9} {:>14} {:>8}  STATE",
            "LINK", "DELAY", "JITTER", "BANDWIDTH", "LOSS"
        );
        for link in links {
            let bandwidth = match link.bandwidth_mbit {
                Some(mbit) => format!("{mbit} Mbit/s"),
                None => "unlimited".to_string(),
            };
            println!(
                "{:<16} {:>9} {:>9} {:>14} {:>8}  {}",
                format!("{} <-> {}", link.a, link.b),
                format!("{} ms", link.delay_ms),
                format!("{} ms", link.jitter_ms),
                bandwidth,
                format!("{} %", link.loss_pct),
                if link.cut { "CUT" } else { "up" }
            );
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
    if let Some(metadata) = &status.metadata {
        let leader = metadata.leader.as_deref().unwrap_or("none known");
        println!(
            "metadata:         {}, leader {leader}, term {}, committed {}, applied {}{}",
            metadata.state,
            metadata.term,
            metadata.commit_index,
            metadata.applied_index,
            if metadata.quorum {
                ""
            } else {
                " (NO QUORUM: volume changes fail)"
            }
        );
        let voters: Vec<String> = metadata
            .voters
            .iter()
            .map(|voter| {
                let reach = if voter.reachable { "" } else { ", UNREACHABLE" };
                format!("{} ({} at {}{reach})", voter.name, voter.role, voter.site)
            })
            .collect();
        println!("voters:           {}", voters.join(", "));
    }
    if let Some(lease) = &status.lease {
        if lease.valid {
            println!(
                "lease:            held, runs out in {} ms unless renewed (lease {} ms, renewed every {} ms)",
                lease.expires_in_ms, lease.lease_ms, lease.renew_ms
            );
        } else {
            println!(
                "lease:            NOT HELD: this site's volumes accept no writes ({} requests held, {} failed)",
                status.suspended_requests, status.suspended_failed_total
            );
        }
    }
    if !status.lost_sites.is_empty() {
        println!("sites without lease: {}", status.lost_sites.join(", "));
    }
    for volume in &status.suspended_volumes {
        println!("suspended:        {}: {}", volume.name, volume.reason);
    }
    if status.failover_lost_deltas > 0 {
        println!(
            "lost at failover: {} deltas ({} bytes) acknowledged here after another site took over",
            status.failover_lost_deltas, status.failover_lost_bytes
        );
    }
    for peer in &status.peers {
        let state = match (peer.connected, peer.rtt_ms) {
            (true, Some(rtt)) => format!("connected, rtt {rtt:.1} ms"),
            (true, None) => "connected".to_string(),
            (false, _) => "NOT CONNECTED".to_string(),
        };
        println!("site {:<12} {state}", format!("{}:", peer.site));
    }
    if !status.peers.is_empty() {
        println!(
            "replication:      {} bytes not yet applied at every site, {} regions to resync",
            status.backlog_bytes, status.resync_regions_left
        );
    }
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
