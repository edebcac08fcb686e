//! The event trace: a stable hash of everything that happened (FNV-1a over
//! simulated nanoseconds and event fields, never wall-clock values), and in
//! replay mode a readable line per event.

#[derive(Debug, Clone)]
pub struct Trace {
    hash: u64,
    lines: Option<Vec<String>>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Trace {
    pub fn new(keep_lines: bool) -> Self {
        Trace {
            hash: FNV_OFFSET,
            lines: keep_lines.then(Vec::new),
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Records one event: `fields` go into the hash; `describe` is only
    /// called when lines are kept.
    pub fn record(&mut self, now_ns: u64, fields: &[u64], describe: impl FnOnce() -> String) {
        self.mix(now_ns);
        for field in fields {
            self.mix(*field);
        }
        if let Some(lines) = &mut self.lines {
            lines.push(format!("{:>12.6} ms  {}", now_ns as f64 / 1e6, describe()));
        }
    }

    pub fn take_lines(&mut self) -> Vec<String> {
        self.lines.take().unwrap_or_default()
    }

    fn mix(&mut self, value: u64) {
        for byte in value.to_le_bytes() {
            self.hash ^= byte as u64;
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
    }
}
