//! openraft's own storage test suite, run against both backends.

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use stretch_metadata::{LogStore, MemBackend, RedbBackend, StateMachine, TypeConfig};

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore<RedbBackend>, StateMachine<RedbBackend>, tempfile::TempDir>
    for RedbBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            tempfile::TempDir,
            LogStore<RedbBackend>,
            StateMachine<RedbBackend>,
        ),
        StorageError<TypeConfig>,
    > {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = RedbBackend::open(dir.path().join("metadata.redb")).expect("open store");
        let sm = StateMachine::<_, TypeConfig>::open(backend.clone()).expect("open state machine");
        Ok((dir, LogStore::<_, TypeConfig>::new(backend), sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, LogStore<MemBackend>, StateMachine<MemBackend>> for MemBuilder {
    async fn build(
        &self,
    ) -> Result<((), LogStore<MemBackend>, StateMachine<MemBackend>), StorageError<TypeConfig>>
    {
        let backend = MemBackend::new();
        let sm = StateMachine::<_, TypeConfig>::open(backend.clone()).expect("open state machine");
        Ok(((), LogStore::<_, TypeConfig>::new(backend), sm))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn redb_store_passes_openraft_suite() {
    runtime()
        .block_on(Suite::test_all(RedbBuilder))
        .expect("suite");
}

#[test]
fn mem_store_passes_openraft_suite() {
    runtime()
        .block_on(Suite::test_all(MemBuilder))
        .expect("suite");
}

stretch_metadata::declare_metadata_config!(
    /// What the simulator will declare: every random draw of openraft from
    /// a seed.
    SimConfig,
    openraft_rt::deterministic_rng::DeterministicRng<openraft_rt_tokio::TokioRuntime>
);

struct SimMemBuilder;

impl
    StoreBuilder<
        SimConfig,
        LogStore<MemBackend<SimConfig>, SimConfig>,
        StateMachine<MemBackend<SimConfig>, SimConfig>,
    > for SimMemBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            (),
            LogStore<MemBackend<SimConfig>, SimConfig>,
            StateMachine<MemBackend<SimConfig>, SimConfig>,
        ),
        StorageError<SimConfig>,
    > {
        let backend = MemBackend::<SimConfig>::new();
        let sm = StateMachine::open(backend.clone()).expect("open state machine");
        Ok(((), LogStore::new(backend), sm))
    }
}

#[test]
fn mem_store_passes_openraft_suite_under_a_deterministic_runtime() {
    let seeded =
        openraft_rt::deterministic_rng::DeterministicRng::<openraft_rt_tokio::TokioRuntime>::scope(
            42,
            Suite::test_all(SimMemBuilder),
        );
    runtime().block_on(seeded).expect("suite");
}
