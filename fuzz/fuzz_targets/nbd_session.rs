//! One whole NBD connection from untrusted client bytes: the fixed-newstyle
//! handshake (client flags, option haggling, GO/INFO/LIST/EXPORT_NAME
//! payloads), then transmission (request headers, write payloads), served
//! by `stretch_nbd::serve_stream` over an in-memory pipe against an
//! in-memory export. Must hold: no panic, and the connection ends once the
//! client's bytes run out.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use stretch_nbd::{Backend, Export, ExportError, ExportListing, OpenError, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EXPORT_BYTES: u64 = 1 << 20;

struct Disk {
    read_only: bool,
}

impl Export for Disk {
    fn size(&self) -> u64 {
        EXPORT_BYTES
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        assert!(length > 0 && offset + u64::from(length) <= EXPORT_BYTES);
        Ok(Bytes::from(vec![0u8; length as usize]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        assert!(!self.read_only);
        assert!(!data.is_empty() && offset + data.len() as u64 <= EXPORT_BYTES);
        Ok(())
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<(), ExportError> {
        assert!(length > 0 && offset + u64::from(length) <= EXPORT_BYTES);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, length: u32, _fua: bool) -> Result<(), ExportError> {
        assert!(length > 0 && offset + u64::from(length) <= EXPORT_BYTES);
        Ok(())
    }
}

struct Disks;

impl Backend for Disks {
    type Export = Disk;
    fn list(&self) -> Vec<ExportListing> {
        vec![
            ExportListing {
                name: "disk".into(),
                description: "read-write".into(),
            },
            ExportListing {
                name: "ro".into(),
                description: String::new(),
            },
        ]
    }
    fn open(&self, name: &str) -> Result<Arc<Disk>, OpenError> {
        match name {
            "" | "disk" => Ok(Arc::new(Disk { read_only: false })),
            "ro" => Ok(Arc::new(Disk { read_only: true })),
            "busy" => Err(OpenError::Unavailable(name.into(), "busy".into())),
            _ => Err(OpenError::Unknown(name.into())),
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    // Small limits keep each run cheap; the checks are the same code.
    let config = ServerConfig {
        max_request_bytes: 64 << 10,
        max_in_flight_bytes: 1 << 20,
        max_option_bytes: 8 << 10,
        ..ServerConfig::default()
    };
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let serve = stretch_nbd::serve_stream(server, Arc::new(Disks), config);
        let client = async move {
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let send = async {
                let _ = to_server.write_all(data).await;
                let _ = to_server.shutdown().await;
            };
            let receive = async {
                let mut replies = Vec::new();
                let _ = from_server.read_to_end(&mut replies).await;
            };
            tokio::join!(send, receive);
        };
        let (served, ()) = tokio::join!(serve, client);
        served.expect("the configuration is valid");
    });
});
