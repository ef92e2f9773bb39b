//! Property tests: every Envelope round-trips through the Avro datum, and
//! decoding arbitrary or corrupted bytes never panics.

use chat_schemas::*;
use proptest::option::of;
use proptest::prelude::*;
use uuid::Uuid;

fn text() -> impl Strategy<Value = String> {
    any::<String>()
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

/// Avro `long` is signed: the Rust u64 values in range.
fn seq() -> impl Strategy<Value = u64> {
    0..=i64::MAX as u64
}

fn count() -> impl Strategy<Value = u32> {
    0..=i32::MAX as u32
}

fn ts() -> impl Strategy<Value = i64> {
    any::<i64>()
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Admin), Just(Role::Member)]
}

fn media() -> impl Strategy<Value = MediaRef> {
    (text(), text(), seq(), of(count()), of(count()), text()).prop_map(
        |(object_key, mime_type, size_bytes, width, height, sha256)| MediaRef {
            object_key,
            mime_type,
            size_bytes,
            width,
            height,
            sha256,
        },
    )
}

fn body() -> impl Strategy<Value = Body> {
    let kind = prop_oneof![Just(MessageKind::Text), Just(MessageKind::Media)];
    let chat_kind = prop_oneof![Just(ChatKind::Direct), Just(ChatKind::Group)];
    let reason = prop_oneof![Just(RemovalReason::Left), Just(RemovalReason::Removed)];
    let status = prop_oneof![Just(PresenceStatus::Online), Just(PresenceStatus::Offline)];
    let member = (text(), role()).prop_map(|(user_id, role)| ChatMember { user_id, role });
    prop_oneof![
        (kind, of(text()), of(media()), of(seq())).prop_map(|(kind, text, media, reply_to_seq)| {
            Body::MessageSent(MessageSent {
                kind,
                text,
                media,
                reply_to_seq,
            })
        }),
        (seq(), text()).prop_map(|(target_seq, text)| {
            Body::MessageEdited(MessageEdited { target_seq, text })
        }),
        (seq(), any::<bool>()).prop_map(|(target_seq, for_everyone)| {
            Body::MessageDeleted(MessageDeleted {
                target_seq,
                for_everyone,
            })
        }),
        (seq(), text(), any::<bool>()).prop_map(|(target_seq, emoji, added)| {
            Body::ReactionChanged(ReactionChanged {
                target_seq,
                emoji,
                added,
            })
        }),
        (seq(), text()).prop_map(|(up_to_seq, device)| {
            Body::DeliveryReceipt(DeliveryReceipt { up_to_seq, device })
        }),
        seq().prop_map(|up_to_seq| Body::ReadReceipt(ReadReceipt { up_to_seq })),
        (
            chat_kind,
            of(text()),
            prop::collection::vec(member, 0..5),
            count()
        )
            .prop_map(|(kind, title, members, max_members)| {
                Body::ChatCreated(ChatCreated {
                    kind,
                    title,
                    members,
                    max_members,
                })
            }),
        (text(), role())
            .prop_map(|(user_id, role)| Body::MemberAdded(MemberAdded { user_id, role })),
        (text(), reason).prop_map(|(user_id, reason)| {
            Body::MemberRemoved(MemberRemoved { user_id, reason })
        }),
        (text(), role()).prop_map(|(user_id, role)| {
            Body::MemberRoleChanged(MemberRoleChanged { user_id, role })
        }),
        (text(), status, of(ts())).prop_map(|(user_id, status, last_seen)| {
            Body::PresenceChanged(PresenceChanged {
                user_id,
                status,
                last_seen,
            })
        }),
        (any::<bool>(), ts())
            .prop_map(|(active, expires_at)| Body::Typing(Typing { active, expires_at })),
        (text(), text(), uuid(), ts()).prop_map(
            |(gateway_id, device_id, session_id, opened_at)| {
                Body::SessionOpened(SessionOpened {
                    gateway_id,
                    device_id,
                    session_id,
                    opened_at,
                })
            }
        ),
        (text(), text(), uuid(), text()).prop_map(|(gateway_id, device_id, session_id, reason)| {
            Body::SessionClosed(SessionClosed {
                gateway_id,
                device_id,
                session_id,
                reason,
            })
        }),
        (
            (text(), uuid(), seq(), text(), of(text()), count(), ts()),
            (
                of(text()),
                of(text()),
                of(text()),
                of(text()),
                of(count()),
                of(count())
            ),
            (of(text()), of(text()), of(text()), of(text()), of(ts())),
        )
            .prop_map(
                |(
                    (user_id, chat_id, seq, title, body_preview, attempt, not_before),
                    (device_id, provider, token, locale, count, badge),
                    (collapse_key, dedupe_key, sender_id, kind, created_ts),
                )| {
                    Body::PushTask(PushTask {
                        user_id,
                        chat_id,
                        seq,
                        title,
                        body_preview,
                        attempt,
                        not_before,
                        device_id,
                        provider,
                        token,
                        locale,
                        count,
                        badge,
                        collapse_key,
                        dedupe_key,
                        sender_id,
                        kind,
                        created_ts,
                    })
                }
            ),
        (
            uuid(),
            outcome(),
            of(seq()),
            of(text()),
            of(text()),
            of(0u32..64),
            of(seq())
        )
            .prop_map(
                |(command_event_id, outcome, seq, code, reason, event_partition, event_offset)| {
                    Body::CommandResult(CommandResult {
                        command_event_id,
                        outcome,
                        seq,
                        code,
                        reason,
                        event_partition,
                        event_offset,
                    })
                }
            ),
        session_routed(),
        (text(), uuid(), seq()).prop_map(|(gateway_id, instance_id, interval_ms)| {
            Body::GatewayHeartbeat(GatewayHeartbeat {
                gateway_id,
                instance_id,
                interval_ms,
            })
        }),
        any::<bool>()
            .prop_map(|hidden| Body::PresenceSettingChanged(PresenceSettingChanged { hidden })),
        (text(), ts()).prop_map(
            |(device_id, revoked_at)| Body::DeviceRevoked(DeviceRevoked {
                device_id,
                revoked_at
            })
        ),
        any::<bool>().prop_map(|muted| Body::MuteChanged(MuteChanged { muted })),
        (
            text(),
            text(),
            of(text()),
            of(text()),
            of(text()),
            of(text())
        )
            .prop_map(
                |(device_id, provider, token, locale, reason, provider_detail)| {
                    Body::PushRegistrationChanged(PushRegistrationChanged {
                        device_id,
                        provider,
                        token,
                        locale,
                        reason,
                        provider_detail,
                    })
                }
            ),
    ]
}

fn session_routed() -> impl Strategy<Value = Body> {
    (uuid(), proptest::collection::vec(seq(), 0..16)).prop_map(|(session_id, router_offsets)| {
        Body::SessionRouted(SessionRouted {
            session_id,
            router_offsets,
        })
    })
}

fn outcome() -> impl Strategy<Value = CommandOutcome> {
    prop_oneof![
        Just(CommandOutcome::Accepted),
        Just(CommandOutcome::Duplicate),
        Just(CommandOutcome::Rejected)
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        (uuid(), of(uuid()), of(seq()), text(), text(), of(text())),
        (of(ts()), ts(), of(ts()), text(), body()),
    )
        .prop_map(
            |(
                (event_id, chat_id, seq, sender_user, sender_device, client_msg_id),
                (client_ts, server_ts, sequenced_ts, trace_id, body),
            )| Envelope {
                event_id,
                chat_id,
                seq,
                sender_user,
                sender_device,
                client_msg_id,
                client_ts,
                server_ts,
                sequenced_ts,
                trace_id,
                body,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn datum_round_trips(e in envelope()) {
        let bytes = encode_datum(&e).unwrap();
        prop_assert_eq!(decode_datum(&bytes).unwrap(), e.clone());
        prop_assert_eq!(Envelope::from_avro(e.to_avro()).unwrap(), e);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_datum(&bytes);
    }

    #[test]
    fn corrupted_datums_never_panic(e in envelope(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut bytes = encode_datum(&e).unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = decode_datum(&bytes);
        let _ = decode_datum(&bytes[..cut.index(bytes.len())]);
    }
}

#[test]
fn every_body_variant_is_generated_and_named() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = body();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        seen.insert(strategy.new_tree(&mut runner).unwrap().current().kind());
    }
    let all: std::collections::BTreeSet<_> = Body::KINDS.iter().copied().collect();
    assert_eq!(seen, all);
}

#[test]
fn trailing_bytes_are_rejected() {
    let e = Envelope {
        event_id: Uuid::from_u128(1),
        chat_id: None,
        seq: None,
        sender_user: "u".into(),
        sender_device: "d".into(),
        client_msg_id: None,
        client_ts: None,
        server_ts: 0,
        sequenced_ts: None,
        trace_id: "t".into(),
        body: Body::ReadReceipt(ReadReceipt { up_to_seq: 7 }),
    };
    let mut bytes = encode_datum(&e).unwrap();
    assert_eq!(decode_datum(&bytes).unwrap().body.kind(), "ReadReceipt");
    bytes.push(0);
    assert!(matches!(
        decode_datum(&bytes),
        Err(SchemaError::TrailingBytes(1))
    ));
}
