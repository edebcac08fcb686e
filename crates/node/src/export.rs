//! The NBD backend: every volume is an export of the same name, whose reads
//! are strict (at a site that does not own the volume they ask the owner
//! for newer blocks), and a read-only export `NAME@snapshot` that serves
//! the newest whole-delta image held at this site with no round trip.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use stretch_core::{Request, RequestError, Response, VolumeId};
use stretch_nbd::{Backend, Export, ExportError, ExportListing, OpenError};

use crate::metrics::{OperationMetrics, VolumeMetrics};
use crate::node::Node;

#[derive(Debug)]
pub(crate) struct VolumeBackend {
    node: Arc<Node>,
}

impl VolumeBackend {
    pub fn new(node: Arc<Node>) -> Self {
        VolumeBackend { node }
    }
}

impl Backend for VolumeBackend {
    type Export = VolumeExport;

    fn list(&self) -> Vec<ExportListing> {
        self.node
            .volumes()
            .into_iter()
            .flat_map(|record| {
                let strict = ExportListing {
                    description: format!(
                        "stretch volume {} ({} bytes, group {}, owner site {})",
                        record.name,
                        record.size,
                        record.group,
                        self.node.owner_name(&record)
                    ),
                    name: record.name.clone(),
                };
                let snapshot = ExportListing {
                    description: format!(
                        "read-only: newest whole-delta image of {} held at site {}",
                        record.name, self.node.site
                    ),
                    name: format!("{}{SNAPSHOT_SUFFIX}", record.name),
                };
                [strict, snapshot]
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Arc<VolumeExport>, OpenError> {
        let (volume_name, snapshot) = match name.strip_suffix(SNAPSHOT_SUFFIX) {
            Some(volume_name) => (volume_name, true),
            None => (name, false),
        };
        let Some(record) = self.node.volume(volume_name) else {
            return Err(OpenError::Unknown(name.to_string()));
        };
        Ok(Arc::new(VolumeExport {
            node: self.node.clone(),
            volume: record.volume_id(),
            size: record.size,
            snapshot,
            metrics: self.node.driver.metrics.volume(volume_name),
        }))
    }
}

/// One client's view of one volume.
/// Export-name suffix of a volume's snapshot export.
pub const SNAPSHOT_SUFFIX: &str = "@snapshot";

#[derive(Debug)]
pub(crate) struct VolumeExport {
    node: Arc<Node>,
    volume: VolumeId,
    size: u64,
    /// Read-only, served from the newest whole delta held at this site.
    snapshot: bool,
    metrics: VolumeMetrics,
}

impl VolumeExport {
    async fn run(
        &self,
        request: Request,
        metrics: &OperationMetrics,
    ) -> Result<Response, ExportError> {
        let started = Instant::now();
        metrics.requests.inc();
        let result = self.node.driver.submit(request).await;
        metrics.latency.observe(started.elapsed().as_secs_f64());
        result.map_err(|error| {
            metrics.errors.inc();
            tracing::debug!(volume = %self.volume, %error, "request failed");
            export_error(error)
        })
    }
}

fn export_error(error: RequestError) -> ExportError {
    match error {
        RequestError::OutOfRange { .. } | RequestError::TooLarge { .. } => {
            ExportError::Invalid(error.to_string())
        }
        RequestError::NoVolume(_) | RequestError::Io(_) | RequestError::Failed(_) => {
            ExportError::Io(error.to_string())
        }
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.snapshot
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        let request = if self.snapshot {
            Request::ReadSnapshot {
                volume: self.volume,
                offset,
                length: length as u64,
            }
        } else {
            Request::Read {
                volume: self.volume,
                offset,
                length: length as u64,
            }
        };
        match self.run(request, &self.metrics.read).await? {
            Response::Data(data) => {
                self.metrics.read_bytes.inc_by(data.len() as u64);
                Ok(data)
            }
            Response::Done => Err(ExportError::Io("read answered without data".into())),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let length = data.len() as u64;
        let request = Request::Write {
            volume: self.volume,
            offset,
            data,
            fua,
        };
        self.run(request, &self.metrics.write).await?;
        self.metrics.write_bytes.inc_by(length);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        if self.snapshot {
            // Nothing is ever written through a snapshot export.
            return Ok(());
        }
        let request = Request::Flush {
            volume: self.volume,
        };
        self.run(request, &self.metrics.flush).await.map(|_| ())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        let request = Request::Trim {
            volume: self.volume,
            offset,
            length: length as u64,
        };
        // A trim changes nothing on disk, so FUA adds nothing to it.
        let _ = fua;
        self.run(request, &self.metrics.trim).await.map(|_| ())
    }

    async fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        let request = Request::WriteZeroes {
            volume: self.volume,
            offset,
            length: length as u64,
            fua,
        };
        self.run(request, &self.metrics.write_zeroes)
            .await
            .map(|_| ())
    }
}
