//! The request messages of `IngestService` (and `RulesService/DryRun`) as their servers read
//! them: each `Event` (and each Customer.io webhook) stays the bytes it arrived as.
//!
//! `Event event = 1` and `bytes event = 1` are the same on the wire (a length-delimited field),
//! so these types decode any request a client encodes with the generated `SendRequest`,
//! `SendBatchRequest` and `StreamRequest`. The bytes are slices of the received buffer (no copy);
//! the gRPC door decodes each event from them and keeps them as the event's
//! input, so the relay never serialises a gRPC event again to store it. One difference from
//! decoding the full types: a request that repeats its singular `event` (or `webhook`) field
//! keeps the last occurrence instead of merging the two (protobuf encoders never write such a
//! request).

use bytes::Bytes;
use prost::Message;

/// `lytics_relay.v1.SendRequest`, its event undecoded.
#[derive(Clone, PartialEq, Message)]
pub struct SendRequest {
    /// The encoded `Event`.
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub event: Option<Bytes>,
}

/// `lytics_relay.v1.SendBatchRequest`, its events undecoded.
#[derive(Clone, PartialEq, Message)]
pub struct SendBatchRequest {
    /// The encoded `Event`s, in request order.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub events: Vec<Bytes>,
}

/// `lytics_relay.v1.StreamRequest`, its event undecoded.
#[derive(Clone, PartialEq, Message)]
pub struct StreamRequest {
    /// The encoded `Event`.
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub event: Option<Bytes>,
}

/// `lytics_relay.v1.SendCustomerIoEventRequest`, its webhook undecoded, so that a webhook the
/// door cannot decode is answered with a field violation like a bad event.
#[derive(Clone, PartialEq, Message)]
pub struct SendCustomerIoEventRequest {
    /// The encoded `google.protobuf.Struct`.
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub webhook: Option<Bytes>,
}

/// `lytics_relay.v1.DryRunRequest`, its event or webhook undecoded, so that one the door cannot
/// decode is answered with a field violation as `Send` answers it.
#[derive(Clone, PartialEq, Message)]
pub struct DryRunRequest {
    /// The encoded `Event`.
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub event: Option<Bytes>,
    /// The encoded `google.protobuf.Struct`.
    #[prost(bytes = "bytes", optional, tag = "2")]
    pub customerio_webhook: Option<Bytes>,
    /// The integration whose settings the rules see.
    #[prost(string, tag = "3")]
    pub integration: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::JsonStruct;
    use crate::proto::v1 as pb;

    fn event(name: &str) -> pb::Event {
        let mut props = serde_json::Map::new();
        props.insert(
            "plan".into(),
            serde_json::json!({"tier": "pro", "seats": [1, 2.5, null]}),
        );
        pb::Event {
            r#type: "track".into(),
            event: name.into(),
            user_id: "u1".into(),
            properties: Some(JsonStruct(props)),
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_decodes_to_each_event_as_encoded() {
        let events = vec![event("A"), event("B"), pb::Event::default()];
        let wire = pb::SendBatchRequest {
            events: events.clone(),
        }
        .encode_to_vec();
        let raw = SendBatchRequest::decode(Bytes::from(wire.clone())).unwrap();
        assert_eq!(raw.events.len(), 3);
        for (bytes, event) in raw.events.iter().zip(&events) {
            assert_eq!(&bytes[..], &event.encode_to_vec()[..]);
            assert_eq!(&pb::Event::decode(&bytes[..]).unwrap(), event);
        }
        // And back: the raw form encodes to the same bytes.
        assert_eq!(raw.encode_to_vec(), wire);
    }

    #[test]
    fn a_send_decodes_with_or_without_its_event() {
        let wire = pb::SendRequest {
            event: Some(event("A")),
        }
        .encode_to_vec();
        let raw = SendRequest::decode(&wire[..]).unwrap();
        assert_eq!(
            pb::Event::decode(raw.event.as_deref().unwrap()).unwrap(),
            event("A")
        );
        let none = SendRequest::decode(&pb::SendRequest { event: None }.encode_to_vec()[..]).unwrap();
        assert!(none.event.is_none());
        let stream = StreamRequest::decode(
            &pb::StreamRequest {
                event: Some(event("S")),
            }
            .encode_to_vec()[..],
        )
        .unwrap();
        assert_eq!(
            pb::Event::decode(stream.event.as_deref().unwrap()).unwrap(),
            event("S")
        );
    }

    #[test]
    fn a_customer_io_webhook_decodes_to_its_struct_as_encoded() {
        let mut data = serde_json::Map::new();
        data.insert("email_address".into(), serde_json::json!("ada@example.com"));
        let webhook = JsonStruct(data);
        let wire = pb::SendCustomerIoEventRequest {
            webhook: Some(webhook.clone()),
        }
        .encode_to_vec();
        let raw = SendCustomerIoEventRequest::decode(&wire[..]).unwrap();
        assert_eq!(
            JsonStruct::decode(raw.webhook.as_deref().unwrap()).unwrap(),
            webhook
        );
        let none = pb::SendCustomerIoEventRequest { webhook: None }.encode_to_vec();
        assert!(
            SendCustomerIoEventRequest::decode(&none[..])
                .unwrap()
                .webhook
                .is_none()
        );
    }

    #[test]
    fn unknown_fields_are_skipped_and_malformed_events_refused() {
        let mut wire = pb::SendBatchRequest {
            events: vec![event("A")],
        }
        .encode_to_vec();
        // Field 9, varint 150: unknown to the request, skipped as the full type skips it.
        wire.extend_from_slice(&[0x48, 0x96, 0x01]);
        let raw = SendBatchRequest::decode(&wire[..]).unwrap();
        assert_eq!(raw.events.len(), 1);
        // A length past the end of the request fails the request, as it fails the full type.
        assert!(SendBatchRequest::decode(&[0x0a, 0x05, 0x0a][..]).is_err());
        assert!(pb::SendBatchRequest::decode(&[0x0a, 0x05, 0x0a][..]).is_err());
        // A well-framed event whose own bytes are not an Event is refused when decoded.
        let raw = SendBatchRequest::decode(&[0x0a, 0x02, 0x0a, 0x05][..]).unwrap();
        assert!(pb::Event::decode(&raw.events[0][..]).is_err());
    }
}
