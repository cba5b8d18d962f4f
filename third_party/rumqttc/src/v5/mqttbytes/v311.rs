//! lathe patch: the v5 client speaking MQTT 3.1.1 on the wire.
//!
//! Some plant brokers speak only 3.1.1 (Cirrus Link's MQTT Distributor under Ignition, Azure
//! IoT Hub, mosquitto before 1.6). Rather than a second client, the v5 client keeps its
//! packets, state and event loop, and its codec writes and reads them in 3.1.1 form with the
//! crate's own v4 codec: v5 properties are left out going out and absent coming in, v5 reason
//! codes map to the 3.1.1 ones (3.1.1 has fewer: a refused publish or unsubscribe is not
//! reported at all), and the subscription options 3.1.1 lacks (no local, retain as
//! published, retain handling) are not sent.

use bytes::{Bytes, BytesMut};

use super::v5::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet, PingReq, PingResp,
    PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason,
    Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use super::{Error, QoS};
use crate::mqttbytes as v3;
use crate::mqttbytes::v4;

fn qos_out(q: QoS) -> v3::QoS {
    match q {
        QoS::AtMostOnce => v3::QoS::AtMostOnce,
        QoS::AtLeastOnce => v3::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v3::QoS::ExactlyOnce,
    }
}

fn qos_in(q: v3::QoS) -> QoS {
    match q {
        v3::QoS::AtMostOnce => QoS::AtMostOnce,
        v3::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v3::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn error_in(e: v3::Error, max: u32) -> Error {
    match e {
        v3::Error::InsufficientBytes(n) => Error::InsufficientBytes(n),
        v3::Error::PayloadSizeLimitExceeded(pkt_size) => {
            Error::PayloadSizeLimitExceeded { pkt_size, max }
        }
        v3::Error::InvalidConnectReturnCode(c) => Error::InvalidConnectReturnCode(c),
        v3::Error::InvalidPacketType(t) => Error::InvalidPacketType(t),
        v3::Error::InvalidQoS(q) => Error::InvalidQoS(q),
        v3::Error::InvalidSubscribeReasonCode(c) => Error::InvalidSubscribeReasonCode(c),
        v3::Error::PacketIdZero => Error::PacketIdZero,
        v3::Error::TopicNotUtf8 => Error::TopicNotUtf8,
        v3::Error::BoundaryCrossed(n) => Error::BoundaryCrossed(n),
        v3::Error::MalformedRemainingLength => Error::MalformedRemainingLength,
        v3::Error::PayloadRequired => Error::PayloadRequired,
        _ => Error::MalformedPacket,
    }
}

/// Reads the next 3.1.1 packet as its v5 counterpart.
pub fn read(stream: &mut BytesMut, max_size: Option<u32>) -> Result<Packet, Error> {
    let max = max_size.unwrap_or(u32::MAX);
    let packet = v4::Packet::read(stream, max as usize).map_err(|e| error_in(e, max))?;
    Ok(match packet {
        v4::Packet::ConnAck(ack) => Packet::ConnAck(ConnAck {
            session_present: ack.session_present,
            code: match ack.code {
                v4::ConnectReturnCode::Success => ConnectReturnCode::Success,
                v4::ConnectReturnCode::RefusedProtocolVersion => {
                    ConnectReturnCode::RefusedProtocolVersion
                }
                v4::ConnectReturnCode::BadClientId => ConnectReturnCode::BadClientId,
                v4::ConnectReturnCode::ServiceUnavailable => ConnectReturnCode::ServiceUnavailable,
                v4::ConnectReturnCode::BadUserNamePassword => {
                    ConnectReturnCode::BadUserNamePassword
                }
                v4::ConnectReturnCode::NotAuthorized => ConnectReturnCode::NotAuthorized,
            },
            properties: None,
        }),
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos_in(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(PubAck {
            pkid: a.pkid,
            reason: PubAckReason::Success,
            properties: None,
        }),
        v4::Packet::PubRec(a) => Packet::PubRec(PubRec {
            pkid: a.pkid,
            reason: PubRecReason::Success,
            properties: None,
        }),
        v4::Packet::PubRel(a) => Packet::PubRel(PubRel {
            pkid: a.pkid,
            reason: PubRelReason::Success,
            properties: None,
        }),
        v4::Packet::PubComp(a) => Packet::PubComp(PubComp {
            pkid: a.pkid,
            reason: PubCompReason::Success,
            properties: None,
        }),
        v4::Packet::SubAck(a) => Packet::SubAck(SubAck {
            pkid: a.pkid,
            return_codes: a
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => SubscribeReasonCode::Success(qos_in(q)),
                    v4::SubscribeReasonCode::Failure => SubscribeReasonCode::Failure,
                })
                .collect(),
            properties: None,
        }),
        // 3.1.1 has no reason codes for an unsubscribe: the v5 state reads none.
        v4::Packet::UnsubAck(a) => Packet::UnsubAck(UnsubAck {
            pkid: a.pkid,
            reasons: Vec::new(),
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(PingReq),
        v4::Packet::PingResp => Packet::PingResp(PingResp),
        // A 3.1.1 server never sends these; read them as a v5 server's would be.
        v4::Packet::Disconnect => Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties: None,
        }),
        v4::Packet::Connect(_) | v4::Packet::Subscribe(_) | v4::Packet::Unsubscribe(_) => {
            return Err(Error::IncorrectPacketFormat)
        }
    })
}

/// Writes a v5 packet in its 3.1.1 form.
pub fn write(packet: Packet, buffer: &mut BytesMut, max_size: Option<u32>) -> Result<(), Error> {
    let packet = match packet {
        Packet::Connect(connect, will, login) => v4::Packet::Connect(v4::Connect {
            protocol: v3::Protocol::V4,
            keep_alive: connect.keep_alive,
            client_id: connect.client_id,
            clean_session: connect.clean_start,
            last_will: will.map(|w| v4::LastWill {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                message: w.message,
                qos: qos_out(w.qos),
                retain: w.retain,
            }),
            login: login.map(|l| v4::Login {
                username: l.username,
                password: l.password,
            }),
        }),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_out(p.qos),
            retain: p.retain,
            topic: String::from_utf8(p.topic.to_vec()).map_err(|_| Error::TopicNotUtf8)?,
            pkid: p.pkid,
            payload: p.payload,
        }),
        Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck { pkid: a.pkid }),
        Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec { pkid: a.pkid }),
        Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel { pkid: a.pkid }),
        Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp { pkid: a.pkid }),
        Packet::Subscribe(s) => v4::Packet::Subscribe(v4::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| v4::SubscribeFilter {
                    path: f.path,
                    qos: qos_out(f.qos),
                })
                .collect(),
        }),
        Packet::Unsubscribe(u) => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters,
        }),
        Packet::PingReq(_) => v4::Packet::PingReq,
        Packet::PingResp(_) => v4::Packet::PingResp,
        Packet::Disconnect(_) => v4::Packet::Disconnect,
        // Server packets, and AUTH, which 3.1.1 does not have.
        Packet::Auth(_) | Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) => {
            return Err(Error::IncorrectPacketFormat)
        }
    };
    let max = max_size.unwrap_or(u32::MAX) as usize;
    packet.write(buffer, max).map_err(|e| match e {
        v3::Error::OutgoingPacketTooLarge { pkt_size, max } => Error::OutgoingPacketTooLarge {
            pkt_size: pkt_size as u32,
            max: max as u32,
        },
        e => error_in(e, max as u32),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v5::mqttbytes::v5::{Connect, Filter, LastWill, Login, Subscribe};

    /// The bytes a 3.1.1 broker reads are the ones the v4 client writes.
    #[test]
    fn a_connect_is_written_as_protocol_level_4_with_clean_session_off() {
        let mut buf = BytesMut::new();
        let connect = Connect {
            keep_alive: 30,
            client_id: "lathe-a".into(),
            clean_start: false,
            properties: None,
        };
        let will = LastWill::new("lathe/a/status", "off", QoS::AtLeastOnce, true, None);
        let login = Some(Login::new("u", "p"));
        write(Packet::Connect(connect, Some(will), login), &mut buf, None).unwrap();
        let expected = {
            let mut b = BytesMut::new();
            v4::Packet::Connect(v4::Connect {
                protocol: v3::Protocol::V4,
                keep_alive: 30,
                client_id: "lathe-a".into(),
                clean_session: false,
                last_will: Some(v4::LastWill::new(
                    "lathe/a/status",
                    "off",
                    v3::QoS::AtLeastOnce,
                    true,
                )),
                login: Some(v4::Login::new("u", "p")),
            })
            .write(&mut b, usize::MAX)
            .unwrap();
            b
        };
        assert_eq!(buf, expected);
        assert_eq!(buf[8], 4, "protocol level");
    }

    #[test]
    fn a_subscribe_carries_only_the_qos_of_each_filter() {
        let mut buf = BytesMut::new();
        let mut filter = Filter::new("a/+/t", QoS::AtLeastOnce);
        filter.nolocal = true;
        let subscribe = Subscribe::new_many([filter], None);
        write(Packet::Subscribe(subscribe), &mut buf, None).unwrap();
        // fixed header, packet id, filter length and name, then the options byte.
        assert_eq!(buf.last(), Some(&1));
        assert_eq!(buf.len(), 2 + 2 + 2 + 5 + 1);
    }

    #[test]
    fn packets_from_a_311_broker_read_as_v5_ones() {
        // CONNACK, session present, accepted; PUBLISH QoS 1; PUBACK; SUBACK; UNSUBACK.
        let mut stream = BytesMut::from(
            &[
                0x20, 2, 1, 0, //
                0x32, 8, 0, 3, b'a', b'/', b'b', 0, 7, b'x', //
                0x40, 2, 0, 9, //
                0x90, 4, 0, 5, 1, 0x80, //
                0xb0, 2, 0, 6,
            ][..],
        );
        match read(&mut stream, None).unwrap() {
            Packet::ConnAck(a) => {
                assert!(a.session_present);
                assert_eq!(a.code, ConnectReturnCode::Success);
            }
            p => panic!("{p:?}"),
        }
        match read(&mut stream, None).unwrap() {
            Packet::Publish(p) => {
                assert_eq!((&p.topic[..], p.pkid, &p.payload[..]), (&b"a/b"[..], 7, &b"x"[..]));
                assert_eq!(p.qos, QoS::AtLeastOnce);
            }
            p => panic!("{p:?}"),
        }
        assert!(matches!(read(&mut stream, None).unwrap(), Packet::PubAck(PubAck { pkid: 9, .. })));
        match read(&mut stream, None).unwrap() {
            Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                [SubscribeReasonCode::Success(QoS::AtLeastOnce), SubscribeReasonCode::Failure]
            ),
            p => panic!("{p:?}"),
        }
        assert!(matches!(read(&mut stream, None).unwrap(), Packet::UnsubAck(UnsubAck { pkid: 6, .. })));
        assert!(matches!(read(&mut stream, None), Err(Error::InsufficientBytes(_))));
    }

    #[test]
    fn a_refused_connect_reads_as_its_reason() {
        let mut stream = BytesMut::from(&[0x20, 2, 0, 1][..]);
        match read(&mut stream, None).unwrap() {
            Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion),
            p => panic!("{p:?}"),
        }
    }
}
