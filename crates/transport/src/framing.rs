//! Messages on a QUIC stream: one frame after another (see stretch-wire).
//! A frame that is oversized, cut short or malformed ends the stream with
//! an error; the caller logs it, counts it and closes that stream only.

use stretch_wire::{PeerMessage, WireError, decode_frame, encode_frame, frame_length};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Writes one message as a frame. A message the peer would refuse (see
/// [`encode_frame`]) is not sent: the error leaves the stream as it was.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &PeerMessage,
) -> Result<(), FrameError> {
    let frame = encode_frame(message)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// Reads the next message; `Ok(None)` at a clean end of stream (between
/// frames). The length is checked before the frame body is read, so a
/// hostile length costs no memory.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<PeerMessage>, FrameError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < header.len() {
        let read = reader.read(&mut header[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(WireError::Truncated {
                have: filled,
                need: header.len(),
            }
            .into());
        }
        filled += read;
    }
    let length = frame_length(header)?;
    let mut frame = Vec::with_capacity(header.len() + length);
    frame.extend_from_slice(&header);
    let read = reader.take(length as u64).read_to_end(&mut frame).await?;
    if read < length {
        return Err(WireError::Truncated {
            have: read,
            need: length,
        }
        .into());
    }
    Ok(Some(decode_frame(&frame)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn a_message_the_peer_would_refuse_is_not_written() {
        run(async {
            let mut stream = Vec::new();
            let refused = PeerMessage::ReadRequest {
                id: 1,
                volume: 1,
                offset: 0,
                length: 0,
                have: None,
            };
            let error = write_message(&mut stream, &refused).await;
            assert!(
                matches!(error, Err(FrameError::Wire(WireError::Invalid(_)))),
                "{error:?}"
            );
            assert!(stream.is_empty());
            let journaled = PeerMessage::Journaled { group: 1, seq: 2 };
            write_message(&mut stream, &journaled).await.expect("write");
            write_message(&mut stream, &journaled).await.expect("write");
            let mut reader = stream.as_slice();
            for _ in 0..2 {
                let read = read_message(&mut reader).await.expect("read");
                assert_eq!(read, Some(journaled.clone()));
            }
            assert_eq!(read_message(&mut reader).await.expect("end"), None);
        });
    }
}
