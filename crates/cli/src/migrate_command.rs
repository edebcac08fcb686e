//! `stretch volume migrate` and `stretch migration list|cancel`: start a
//! live migration at the owner's node, follow it with a progress bar (plain
//! lines when stdout is not a terminal) until it ends.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use stretch_node::{MIGRATION_TIMEOUT_S_DEFAULT, MigrationInfo, MigrationMode, StartMigration};

use crate::admin_client::AdminClient;

/// How often the progress is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often a plain progress line is printed when not on a terminal.
const PLAIN_LINE_INTERVAL: Duration = Duration::from_secs(5);
/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 30;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["name", "group"])))]
pub struct MigrateArgs {
    /// The volume to migrate, with the rest of its consistency group.
    name: Option<String>,
    /// Migrate this consistency group (all of a VM's disks) instead.
    #[arg(long)]
    group: Option<String>,
    /// The site that takes the group over.
    #[arg(long)]
    to: String,
    /// drain: the target catches up while writes go on at the source; writes
    /// pause only at the switchover, for about one round trip and one
    /// metadata commit. fast: ownership moves at once (writes pause while
    /// the source's last delta reaches its journal, whatever the backlog);
    /// the target serves from then on and copies the data it lacks from
    /// the source, a request waiting only for the region it touches. Two
    /// data sites only. If the source is lost before the copy ends, the
    /// regions not copied wait for it (`stretch volume accept-loss` gives
    /// them up).
    #[arg(long, default_value = "drain", value_parser = ["drain", "fast"])]
    mode: String,
    /// Give up (the group stays at the source, with the reason) if the
    /// switchover has not happened within this many seconds (drain: the
    /// backlog did not converge; fast: the target did not stream).
    #[arg(long, default_value_t = MIGRATION_TIMEOUT_S_DEFAULT)]
    timeout: u64,
    /// Return once the migration is recorded; follow it with `stretch
    /// migration list`.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// List the migrations in flight and the last ones the node asked
    /// ran (progress is known at the source's node).
    List,
    /// Cancel the migration of a group (a group or volume name): writes
    /// stay at the source. A switchover already committed is not undone.
    Cancel { name: String },
}

/// Starts a migration and, unless `--no-wait`, follows it to its end; an
/// error when it does not end with the group at the target.
pub fn migrate(client: &AdminClient, args: MigrateArgs) -> anyhow::Result<()> {
    let started = client.start_migration(&StartMigration {
        volume: args.name.clone(),
        group: args.group.clone(),
        to: args.to.clone(),
        timeout_s: Some(args.timeout),
        mode: match args.mode.as_str() {
            "fast" => MigrationMode::Fast,
            _ => MigrationMode::Drain,
        },
    })?;
    let what = describe(&started);
    if args.no_wait {
        println!(
            "migrating {what} from {} to {} (follow with `stretch migration list`)",
            started.from, started.to
        );
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal();
    if !terminal {
        println!("migrating {what} from {} to {}", started.from, started.to);
    }
    let mut last_line = Instant::now();
    let mut last_phase = started.phase.clone();
    let ended = loop {
        std::thread::sleep(POLL_INTERVAL);
        let Some(info) = client
            .migrations()?
            .into_iter()
            .find(|info| info.id == started.id && info.group == started.group)
        else {
            anyhow::bail!("the node no longer knows the migration of {what} (did it restart?)");
        };
        if info.finished() {
            break info;
        }
        if terminal {
            print!("\r{}\x1b[K", progress_line(&info));
            let _ = std::io::stdout().flush();
        } else if last_line.elapsed() >= PLAIN_LINE_INTERVAL || info.phase != last_phase {
            println!("{}", progress_line(&info));
            last_line = Instant::now();
        }
        last_phase = info.phase.clone();
    };
    if terminal {
        println!("\r{}\x1b[K", progress_line(&ended));
    }
    match ended.phase.as_str() {
        "done" if ended.mode == "fast" => {
            println!(
                "migrated {what} from {} to {} in {:.1} s (fast): ownership moved after {:.1} s, writes paused {} ms at the switchover (epoch {}), then {} copied the {} it lacked{}",
                ended.from,
                ended.to,
                ended.elapsed_ms as f64 / 1000.0,
                ended.switched_after_ms.unwrap_or(0) as f64 / 1000.0,
                ended.pause_ms.unwrap_or(0),
                ended.epoch.unwrap_or(0),
                ended.to,
                mib(ended.bytes_left_max),
                retries(&ended),
            );
            Ok(())
        }
        "done" => {
            println!(
                "migrated {what} from {} to {} in {:.1} s; writes paused {} ms at the switchover (epoch {}){}",
                ended.from,
                ended.to,
                ended.elapsed_ms as f64 / 1000.0,
                ended.pause_ms.unwrap_or(0),
                ended.epoch.unwrap_or(0),
                retries(&ended),
            );
            Ok(())
        }
        _ => anyhow::bail!(
            "migration of {what} to {} {}: {}",
            ended.to,
            ended.phase,
            ended.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}

pub fn migration(client: &AdminClient, command: MigrationCommand) -> anyhow::Result<()> {
    match command {
        MigrationCommand::List => {
            let migrations = client.migrations()?;
            if migrations.is_empty() {
                println!("no migration in flight or recently ended here");
                return Ok(());
            }
            println!(
                "{:<16} {:<6} {:<6} {:<15} {:>12} {:>9}  DETAIL",
                "GROUP", "FROM", "TO", "PHASE", "LEFT", "ELAPSED"
            );
            for info in migrations {
                let left = info.bytes_left.map_or("-".to_string(), mib);
                let detail = match info.phase.as_str() {
                    "done" => format!(
                        "paused {} ms, epoch {}",
                        info.pause_ms.unwrap_or(0),
                        info.epoch.unwrap_or(0)
                    ),
                    "copying" => format!(
                        "owner since epoch {} (paused {} ms); copying what it lacks",
                        info.epoch.unwrap_or(0),
                        info.pause_ms.unwrap_or(0)
                    ),
                    "catching-up" | "switching-over" => format!(
                        "drain {}/s, writes {}/s, timeout {} s{}",
                        mib(info.drain_bytes_per_second),
                        mib(info.write_bytes_per_second),
                        info.timeout_s,
                        retries(&info)
                    ),
                    _ => info.reason.clone().unwrap_or_default(),
                };
                println!(
                    "{:<16} {:<6} {:<6} {:<15} {:>12} {:>8.1}s  {}",
                    info.group,
                    info.from,
                    info.to,
                    info.phase,
                    left,
                    info.elapsed_ms as f64 / 1000.0,
                    detail
                );
            }
            Ok(())
        }
        MigrationCommand::Cancel { name } => {
            let info = client.cancel_migration(&name)?;
            println!(
                "cancelled the migration of group {}; writes stay at {}",
                info.group,
                if info.from.is_empty() {
                    "the owner"
                } else {
                    &info.from
                }
            );
            Ok(())
        }
    }
}

/// `[#####.....]  45%  120.0 MiB left  drain 90.1 MiB/s  writes 30.2 MiB/s  ETA 3 s`
/// (fast mode, after the switchover: `... 12.0 MiB left to copy at b  (copying)`).
fn progress_line(info: &MigrationInfo) -> String {
    let left = info.bytes_left.unwrap_or(0);
    let whole = info.bytes_left_max.max(1);
    let done_share = if info.phase == "done" {
        1.0
    } else {
        1.0 - left.min(whole) as f64 / whole as f64
    };
    let filled = ((done_share * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
    let bar = format!("{}{}", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled));
    if info.phase == "copying" {
        return format!(
            "[{bar}] {:>3.0}%  {} left to copy at {}  writes there since the switchover ({} ms pause)  ({})",
            done_share * 100.0,
            mib(left),
            info.to,
            info.pause_ms.unwrap_or(0),
            info.phase
        );
    }
    let converging = info
        .drain_bytes_per_second
        .saturating_sub(info.write_bytes_per_second);
    let eta = if left == 0 {
        "0 s".to_string()
    } else if converging == 0 {
        "not converging".to_string()
    } else {
        format!("{} s", left.div_ceil(converging))
    };
    format!(
        "[{bar}] {:>3.0}%  {} left  drain {}/s  writes {}/s  ETA {eta}  ({})",
        done_share * 100.0,
        mib(left),
        mib(info.drain_bytes_per_second),
        mib(info.write_bytes_per_second),
        info.phase
    )
}

fn describe(info: &MigrationInfo) -> String {
    if info.volumes.len() == 1 && info.volumes[0] == info.group {
        format!("volume {}", info.group)
    } else {
        format!("group {} ({})", info.group, info.volumes.join(", "))
    }
}

fn retries(info: &MigrationInfo) -> String {
    match info.switchovers_called_off {
        0 => String::new(),
        count => format!(", {count} switchovers called off first"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
