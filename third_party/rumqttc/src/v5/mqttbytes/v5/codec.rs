use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{Error, Packet, Publish, PublishProperties, QoS};

/// lathe patch: the user property on a PUBLISH that was too large to read under MQTT 3.1.1;
/// its value is the packet's remaining length in bytes. Its payload is empty (never read).
pub const OVERSIZED_PUBLISH: &str = "lathe-oversized-bytes";

/// MQTT v4 codec
#[derive(Debug, Clone)]
pub struct Codec {
    /// Maximum packet size allowed by client
    pub max_incoming_size: Option<u32>,
    /// Maximum packet size allowed by broker
    pub max_outgoing_size: Option<u32>,
    /// lathe patch: read and write the packets in their MQTT 3.1.1 form.
    pub v311: bool,
    /// lathe patch: under 3.1.1 the broker cannot be told a maximum (that is a v5 property),
    /// so a larger PUBLISH is not read whole but skipped as it streams in: its topic and
    /// packet id are kept (so it can be acknowledged and reported, and the broker does not
    /// send it again for ever) and its payload is discarded unread.
    pub v311_max_incoming_size: Option<u32>,
    /// Bytes of a skipped packet still to discard.
    pub skipping: usize,
}

/// What the start of the buffer says about an oversized packet.
enum Oversized {
    No,
    NeedMore,
    /// The PUBLISH as far as it was read, and the whole packet's length.
    Publish(Publish, usize),
}

/// Reads the fixed header (and, for a PUBLISH, the topic and packet id) of the packet at the
/// start of `src` when its remaining length is over `max`.
fn oversized(src: &BytesMut, max: u32) -> Result<Oversized, Error> {
    let (mut remaining, mut shift, mut header) = (0usize, 0, 1);
    loop {
        let Some(&byte) = src.get(header) else { return Ok(Oversized::No) }; // the normal read waits
        remaining |= usize::from(byte & 0x7f) << shift;
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Ok(Oversized::No); // malformed: the normal read says so
        }
    }
    if remaining <= max as usize {
        return Ok(Oversized::No);
    }
    let first = src[0];
    if first >> 4 != 3 {
        return Err(Error::PayloadSizeLimitExceeded { pkt_size: remaining, max });
    }
    let qos = match (first >> 1) & 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => return Err(Error::InvalidQoS(q)),
    };
    let Some(len) = src.get(header..header + 2) else { return Ok(Oversized::NeedMore) };
    let topic_len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let id = header + 2 + topic_len;
    let end = id + if qos == QoS::AtMostOnce { 0 } else { 2 };
    if src.len() < end {
        return Ok(Oversized::NeedMore);
    }
    let pkid = if qos == QoS::AtMostOnce { 0 } else { u16::from_be_bytes([src[id], src[id + 1]]) };
    let properties = PublishProperties {
        user_properties: vec![(OVERSIZED_PUBLISH.to_string(), remaining.to_string())],
        ..PublishProperties::default()
    };
    let publish = Publish {
        dup: first & 0b1000 != 0,
        qos,
        retain: first & 1 != 0,
        topic: Bytes::copy_from_slice(&src[header + 2..id]),
        pkid,
        payload: Bytes::new(),
        properties: Some(properties),
    };
    Ok(Oversized::Publish(publish, header + remaining))
}

impl Decoder for Codec {
    type Item = Packet;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        if self.skipping > 0 {
            let n = self.skipping.min(src.len());
            src.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if let (true, Some(max)) = (self.v311, self.v311_max_incoming_size) {
            match oversized(src, max)? {
                Oversized::No => {}
                Oversized::NeedMore => return Ok(None),
                Oversized::Publish(publish, total) => {
                    let n = total.min(src.len());
                    src.advance(n);
                    self.skipping = total - n;
                    return Ok(Some(Packet::Publish(publish)));
                }
            }
        }
        let read = if self.v311 {
            super::super::v311::read(src, self.max_incoming_size)
        } else {
            Packet::read(src, self.max_incoming_size)
        };
        match read {
            Ok(packet) => Ok(Some(packet)),
            Err(Error::InsufficientBytes(b)) => {
                // Get more packets to construct the incomplete packet
                src.reserve(b);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl Encoder<Packet> for Codec {
    type Error = Error;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), Self::Error> {
        if self.v311 {
            return super::super::v311::write(item, dst, self.max_outgoing_size);
        }
        item.write(dst, self.max_outgoing_size)?;

        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::Encoder;

    use super::{Codec, OVERSIZED_PUBLISH};
    use crate::v5::{
        mqttbytes::{Error, QoS},
        Packet, Publish,
    };

    #[test]
    fn outgoing_max_packet_size_check() {
        let mut buf = BytesMut::new();
        let mut codec = Codec {
            max_incoming_size: Some(100),
            max_outgoing_size: Some(200),
            v311: false,
            v311_max_incoming_size: None,
            skipping: 0,
        };

        let mut small_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 100], None);
        small_publish.pkid = 1;
        codec
            .encode(Packet::Publish(small_publish), &mut buf)
            .unwrap();

        let large_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 265], None);
        match codec.encode(Packet::Publish(large_publish), &mut buf) {
            Err(Error::OutgoingPacketTooLarge {
                pkt_size: 282,
                max: 200,
            }) => {}
            _ => unreachable!(),
        }
    }

    /// lathe patch: under 3.1.1 a PUBLISH past the limit is handed up with its topic and
    /// packet id and no payload, skipped as it streams in (never held whole), and the packet
    /// after it reads as usual.
    #[test]
    fn an_oversized_v311_publish_is_skipped_unread() {
        use tokio_util::codec::Decoder;
        let mut codec = Codec {
            max_incoming_size: None,
            max_outgoing_size: None,
            v311: true,
            v311_max_incoming_size: Some(100),
            skipping: 0,
        };
        let payload = vec![b'x'; 5000];
        let mut wire = vec![0x32u8]; // PUBLISH, QoS 1
        let remaining = 2 + 7 + 2 + payload.len();
        wire.extend([(remaining & 0x7f) as u8 | 0x80, (remaining >> 7) as u8]);
        wire.extend([0, 7]);
        wire.extend(b"a/b/tel");
        wire.extend([0, 9]); // packet id 9
        wire.extend(&payload);
        wire.extend([0x40, 0x02, 0x00, 0x05]); // then a PUBACK for id 5
        let mut buf = BytesMut::new();
        let mut packets = Vec::new();
        for chunk in wire.chunks(300) {
            buf.extend_from_slice(chunk);
            while let Some(p) = codec.decode(&mut buf).unwrap() {
                packets.push(p);
            }
            assert!(buf.len() <= 300, "never held whole: {} bytes buffered", buf.len());
        }
        match &packets[..] {
            [Packet::Publish(p), Packet::PubAck(a)] => {
                assert_eq!((&p.topic[..], p.pkid, p.payload.len()), (&b"a/b/tel"[..], 9, 0));
                let props = p.properties.as_ref().unwrap();
                assert_eq!(props.user_properties, vec![(OVERSIZED_PUBLISH.to_string(), remaining.to_string())]);
                assert_eq!(a.pkid, 5);
            }
            other => panic!("{other:?}"),
        }
    }
}
