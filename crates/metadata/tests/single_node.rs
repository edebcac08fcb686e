//! A real openraft node on the in-memory store: the type configuration, the
//! storage and the state machine work together under `Raft`, and ids stay
//! unique across a restart. No peers: the network refuses every RPC.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Config, Raft, RaftNetworkFactory, RaftNetworkV2};
use stretch_metadata::{
    Backend, Command, Failover, LogStore, MemBackend, Mode, NodeInfo, Outcome, Role, Snapshot,
    StateMachine, TypeConfig, Vote,
};

#[derive(Debug)]
struct NoPeers;

impl RaftNetworkV2<TypeConfig> for NoPeers {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(Unreachable::from_string("no peers in this test").into())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(Unreachable::from_string("no peers in this test").into())
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(Unreachable::from_string("no peers in this test").into())
    }
}

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &NodeInfo) -> Self::Network {
        NoPeers
    }
}

async fn start(backend: &MemBackend) -> Raft<TypeConfig, StateMachine<MemBackend>> {
    let config = Arc::new(Config::default().validate().expect("config"));
    let sm = StateMachine::<_, TypeConfig>::open(backend.clone()).expect("state machine");
    Raft::new(
        1,
        config,
        NoPeers,
        LogStore::<_, TypeConfig>::new(backend.clone()),
        sm,
    )
    .await
    .expect("raft")
}

async fn write(
    raft: &Raft<TypeConfig, StateMachine<MemBackend>>,
    command: Command,
) -> stretch_metadata::CommandResult {
    // The node needs an election after (re)start before it accepts writes.
    for _ in 0..100 {
        match raft.client_write(command.clone()).await {
            Ok(response) => return response.data,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("no leader after 5 s");
}

fn volume(name: &str) -> Command {
    Command::CreateVolume {
        name: name.into(),
        size: 1 << 20,
        group: name.into(),
        mode: Mode::Sync,
        failover: Failover::Manual,
        owner_site: "a".into(),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_single_node_allocates_ids_and_keeps_them_across_a_restart() {
    let backend = MemBackend::new();
    {
        let raft = start(&backend).await;
        let me = NodeInfo {
            name: "a1".into(),
            site: "a".into(),
            role: Role::Data,
            addr: "127.0.0.1:7000".into(),
        };
        raft.initialize(BTreeMap::from([(1u64, me)]))
            .await
            .expect("initialize");
        assert_eq!(
            write(
                &raft,
                Command::AddSite {
                    name: "a".into(),
                    role: Role::Data
                }
            )
            .await,
            Ok(Outcome::Done)
        );
        assert_eq!(
            write(&raft, volume("v1")).await,
            Ok(Outcome::VolumeCreated {
                volume: 1,
                group: 1,
                epoch: 1
            })
        );
        assert!(matches!(
            write(&raft, Command::DeleteVolume { name: "v1".into() }).await,
            Ok(Outcome::VolumeDeleted { volume: 1, .. })
        ));
        raft.shutdown().await.expect("shutdown");
    }
    // Restart on the same records: the counter is where it was, so the
    // deleted id is not handed out again.
    let raft = start(&backend).await;
    assert_eq!(
        write(&raft, volume("v1")).await,
        Ok(Outcome::VolumeCreated {
            volume: 2,
            group: 2,
            epoch: 1
        })
    );
    let applied = backend.applied().expect("applied").expect("some state");
    assert!(applied.metadata.deleted_volumes.contains(&1));
    raft.shutdown().await.expect("shutdown");
}
