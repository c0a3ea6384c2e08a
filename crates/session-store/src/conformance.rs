//! The conformance suite for the `SessionStore` contract: what any implementation (the built-in backends, or a
//! team's own storage behind the same gRPC service) must do for the dialogue-manager to rely on it. It only
//! speaks gRPC to the endpoint, and its users and sessions carry a random prefix, so it can run against a store
//! in use. `cargo xtask conformance session-store <endpoint>` runs it.

use std::{future::Future, pin::Pin, time::Duration};

use moltbot_proto::{Credential, Replicas};
use moltbot_proto::{
    common::v1::ChatMessage,
    session::v1::{
        AppendMessagesRequest, CreateSessionRequest, DeleteSessionRequest, GetSessionRequest, ListSessionsRequest,
        LockSessionRequest, RenewSessionLockRequest, Session, TouchSessionRequest, UnlockSessionRequest,
        UpdateSessionRequest, session_store_client::SessionStoreClient,
    },
};
use tonic::Code;

type Client = SessionStoreClient<Replicas>;
type Outcome = Result<(), String>;
type Check = fn(Ctx) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// One check's result.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: &'static str,
    pub outcome: Outcome,
}

/// What each check gets: a client and a prefix that keeps its users and sessions apart from everyone else's.
#[derive(Clone)]
struct Ctx {
    client: Client,
    prefix: String,
}

impl Ctx {
    fn user(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    async fn create(&self, user: &str, id: &str) -> Result<Session, String> {
        let request =
            CreateSessionRequest { user_id: self.user(user), session_id: id.to_owned(), ..Default::default() };
        self.client.clone().create_session(request).await.map(|r| r.into_inner()).map_err(|s| format!("create: {s}"))
    }

    async fn get(&self, user: &str, id: &str) -> Result<Session, tonic::Status> {
        let request = GetSessionRequest { session_id: id.to_owned(), user_id: self.user(user), ..Default::default() };
        self.client.clone().get_session(request).await.map(|r| r.into_inner())
    }

    async fn append(&self, user: &str, id: &str, messages: &[(&str, &str)]) -> Result<Session, tonic::Status> {
        let messages = messages
            .iter()
            .map(|(role, content)| ChatMessage {
                role: (*role).into(),
                content: (*content).into(),
                ..Default::default()
            })
            .collect();
        let request = AppendMessagesRequest { session_id: id.to_owned(), user_id: self.user(user), messages };
        self.client.clone().append_messages(request).await.map(|r| r.into_inner())
    }

    async fn lock(&self, user: &str, id: &str, lease_ms: u64, wait_ms: u64) -> Result<String, tonic::Status> {
        let request = LockSessionRequest { session_id: id.to_owned(), user_id: self.user(user), lease_ms, wait_ms };
        self.client.clone().lock_session(request).await.map(|r| r.into_inner().token)
    }

    async fn renew(&self, user: &str, id: &str, token: &str, lease_ms: u64) -> Result<bool, String> {
        let request = RenewSessionLockRequest {
            session_id: id.to_owned(),
            token: token.to_owned(),
            lease_ms,
            user_id: self.user(user),
        };
        let response = self.client.clone().renew_session_lock(request).await.map_err(|s| format!("renew: {s}"))?;
        Ok(response.into_inner().renewed)
    }

    async fn unlock(&self, user: &str, id: &str, token: &str) -> Result<bool, String> {
        let request =
            UnlockSessionRequest { session_id: id.to_owned(), token: token.to_owned(), user_id: self.user(user) };
        let response = self.client.clone().unlock_session(request).await.map_err(|s| format!("unlock: {s}"))?;
        Ok(response.into_inner().released)
    }
}

fn expect(ok: bool, what: impl FnOnce() -> String) -> Outcome {
    if ok { Ok(()) } else { Err(what()) }
}

fn expect_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, what: &str) -> Outcome {
    match result {
        Err(s) if s.code() == code => Ok(()),
        Err(s) => Err(format!("{what}: expected {code:?}, got {:?}: {}", s.code(), s.message())),
        Ok(v) => Err(format!("{what}: expected {code:?}, got success: {v:?}")),
    }
}

fn contents(s: &Session) -> Vec<&str> {
    s.messages.iter().map(|m| m.content.as_str()).collect()
}

async fn fresh_sessions_are_empty_owned_and_unguessable(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    expect(s.id.len() >= 22 && s.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), || {
        format!("a generated id must be URL-safe with at least 128 random bits: `{}`", s.id)
    })?;
    expect(s.user_id == ctx.user("a") && s.message_count == 0 && s.messages.is_empty(), || format!("{s:?}"))?;
    let now = now_ms();
    expect(s.created_at_ms <= s.updated_at_ms && s.expires_at_ms > now, || format!("timestamps: {s:?}"))?;
    let other = ctx.create("a", "").await?;
    expect(other.id != s.id, || "two sessions got the same id".into())
}

/// A chosen id is unique per user: another user holding the same id is told nothing of it (no existence oracle),
/// and each sees only their own session.
async fn chosen_ids_are_kept_and_unique_per_user(ctx: Ctx) -> Outcome {
    let id = format!("{}-chosen", ctx.prefix);
    let s = ctx.create("a", &id).await?;
    expect(s.id == id, || format!("asked for {id}, got {}", s.id))?;
    ctx.append("a", &id, &[("user", "a's")]).await.map_err(|e| e.to_string())?;
    let again = CreateSessionRequest { user_id: ctx.user("a"), session_id: id.clone(), ..Default::default() };
    expect_code(ctx.client.clone().create_session(again).await, Code::AlreadyExists, "the same id twice")?;
    let theirs = ctx.create("b", &id).await.map_err(|e| format!("another user's id was refused: {e}"))?;
    expect(theirs.id == id && theirs.message_count == 0, || format!("b's session: {theirs:?}"))?;
    ctx.append("b", &id, &[("user", "b's")]).await.map_err(|e| e.to_string())?;
    let (a, b) = (ctx.get("a", &id).await.map_err(|e| e.to_string())?, ctx.get("b", &id).await);
    let b = b.map_err(|e| e.to_string())?;
    expect(contents(&a) == ["a's"] && contents(&b) == ["b's"], || format!("a sees {a:?}, b sees {b:?}"))?;
    // One user's turn lock does not hold the other's session.
    let token = ctx.lock("a", &id, 60_000, 0).await.map_err(|e| format!("a's lock: {e}"))?;
    let other = ctx.lock("b", &id, 60_000, 0).await.map_err(|e| format!("b's lock while a holds theirs: {e}"))?;
    expect(ctx.unlock("a", &id, &token).await? && ctx.unlock("b", &id, &other).await?, || "unlock".into())
}

async fn bad_ids_are_invalid_arguments(ctx: Ctx) -> Outcome {
    let request =
        CreateSessionRequest { user_id: ctx.user("a"), session_id: "not a valid id!".into(), ..Default::default() };
    expect_code(ctx.client.clone().create_session(request).await, Code::InvalidArgument, "an id with spaces")?;
    let request = CreateSessionRequest { user_id: String::new(), session_id: String::new(), ..Default::default() };
    expect_code(ctx.client.clone().create_session(request).await, Code::InvalidArgument, "an empty user id")
}

async fn missing_sessions_are_not_found(ctx: Ctx) -> Outcome {
    let id = format!("{}-missing", ctx.prefix);
    expect_code(ctx.get("a", &id).await, Code::NotFound, "get")?;
    expect_code(ctx.append("a", &id, &[("user", "hi")]).await, Code::NotFound, "append")?;
    expect_code(ctx.lock("a", &id, 1000, 0).await, Code::NotFound, "lock")
}

async fn another_users_session_is_not_found_everywhere(ctx: Ctx) -> Outcome {
    let s = ctx.create("owner", "").await?;
    ctx.append("owner", &s.id, &[("user", "mine")]).await.map_err(|e| e.to_string())?;
    expect_code(ctx.get("intruder", &s.id).await, Code::NotFound, "get")?;
    expect_code(ctx.append("intruder", &s.id, &[("user", "x")]).await, Code::NotFound, "append")?;
    expect_code(ctx.lock("intruder", &s.id, 1000, 0).await, Code::NotFound, "lock")?;
    let touch = TouchSessionRequest { session_id: s.id.clone(), user_id: ctx.user("intruder") };
    expect_code(ctx.client.clone().touch_session(touch).await, Code::NotFound, "touch")?;
    let delete = DeleteSessionRequest { session_id: s.id.clone(), user_id: ctx.user("intruder") };
    match ctx.client.clone().delete_session(delete).await {
        Ok(r) if !r.get_ref().deleted => {}
        Err(s) if s.code() == Code::NotFound => {}
        other => return Err(format!("delete by another user: {other:?}")),
    }
    let list = ListSessionsRequest { user_id: ctx.user("intruder"), ..Default::default() };
    let listed = ctx.client.clone().list_sessions(list).await.map_err(|e| e.to_string())?.into_inner().sessions;
    expect(listed.is_empty(), || format!("another user lists {listed:?}"))?;
    let kept = ctx.get("owner", &s.id).await.map_err(|e| e.to_string())?;
    expect(contents(&kept) == ["mine"], || format!("the owner's session changed: {kept:?}"))
}

async fn appends_keep_order_roles_and_counts(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    ctx.append("a", &s.id, &[("user", "1"), ("assistant", "2")]).await.map_err(|e| e.to_string())?;
    let after = ctx.append("a", &s.id, &[("user", "3"), ("assistant", "4")]).await.map_err(|e| e.to_string())?;
    expect(after.message_count == 4, || format!("message_count after two appends: {}", after.message_count))?;
    let got = ctx.get("a", &s.id).await.map_err(|e| e.to_string())?;
    let roles: Vec<&str> = got.messages.iter().map(|m| m.role.as_str()).collect();
    expect(contents(&got) == ["1", "2", "3", "4"] && roles == ["user", "assistant", "user", "assistant"], || {
        format!("{got:?}")
    })?;
    expect(got.messages.iter().all(|m| m.created_at_ms > 0), || "messages need timestamps".into())?;
    expect(got.updated_at_ms >= s.updated_at_ms, || "updated_at went back".into())
}

async fn bad_appends_change_nothing(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    let bad_role = ctx.append("a", &s.id, &[("user", "ok"), ("wizard", "no")]).await;
    expect_code(bad_role, Code::InvalidArgument, "an unknown role")?;
    expect_code(ctx.append("a", &s.id, &[]).await, Code::InvalidArgument, "no messages")?;
    let got = ctx.get("a", &s.id).await.map_err(|e| e.to_string())?;
    expect(got.messages.is_empty(), || format!("a refused append stored {:?}", contents(&got)))
}

async fn concurrent_appends_never_interleave(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    let writers = (0..20).map(|i| {
        let (ctx, id) = (ctx.clone(), s.id.clone());
        tokio::spawn(async move {
            let (q, a) = (format!("q{i}"), format!("a{i}"));
            ctx.append("a", &id, &[("user", &q), ("assistant", &a)]).await.map(|_| ())
        })
    });
    for writer in futures::future::join_all(writers).await {
        writer.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    let got = ctx.get("a", &s.id).await.map_err(|e| e.to_string())?;
    expect(got.messages.len() == 40, || format!("{} messages after 20 appends of 2", got.messages.len()))?;
    for pair in got.messages.chunks_exact(2) {
        let ok = pair[0].content.strip_prefix('q').is_some_and(|i| pair[1].content == format!("a{i}"));
        expect(ok, || format!("an append was split: {} then {}", pair[0].content, pair[1].content))?;
    }
    Ok(())
}

async fn messages_page_from_the_oldest(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    let all: Vec<(&str, String)> = (0..5).map(|i| ("user", format!("m{i}"))).collect();
    let refs: Vec<(&str, &str)> = all.iter().map(|(r, c)| (*r, c.as_str())).collect();
    ctx.append("a", &s.id, &refs).await.map_err(|e| e.to_string())?;
    let request =
        GetSessionRequest { session_id: s.id.clone(), user_id: ctx.user("a"), message_offset: 1, message_limit: 2 };
    let page = ctx.client.clone().get_session(request).await.map_err(|e| e.to_string())?.into_inner();
    expect(contents(&page) == ["m1", "m2"] && page.message_count == 5, || format!("page 1+2 of 5: {page:?}"))
}

async fn lists_are_mine_newest_first_and_paged(ctx: Ctx) -> Outcome {
    let mut ids = vec![];
    for _ in 0..3 {
        let s = ctx.create("lister", "").await?;
        // Distinct update times, whatever the store's clock resolution.
        tokio::time::sleep(Duration::from_millis(5)).await;
        ctx.append("lister", &s.id, &[("user", "x")]).await.map_err(|e| e.to_string())?;
        ids.push(s.id);
    }
    let list = |offset, limit| ListSessionsRequest { user_id: ctx.user("lister"), limit, offset };
    let all = ctx.client.clone().list_sessions(list(0, 0)).await.map_err(|e| e.to_string())?.into_inner().sessions;
    let listed: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    expect(listed == newest_first, || format!("expected {newest_first:?}, listed {listed:?}"))?;
    let page = ctx.client.clone().list_sessions(list(1, 1)).await.map_err(|e| e.to_string())?.into_inner().sessions;
    expect(page.len() == 1 && page[0].id == ids[1], || format!("offset 1, limit 1: {page:?}"))
}

async fn deleted_sessions_are_gone(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    ctx.append("a", &s.id, &[("user", "x")]).await.map_err(|e| e.to_string())?;
    let delete = || DeleteSessionRequest { session_id: s.id.clone(), user_id: ctx.user("a") };
    let first = ctx.client.clone().delete_session(delete()).await.map_err(|e| e.to_string())?.into_inner();
    expect(first.deleted, || "the first delete must report deleted".into())?;
    expect_code(ctx.get("a", &s.id).await, Code::NotFound, "get after delete")?;
    expect_code(ctx.append("a", &s.id, &[("user", "y")]).await, Code::NotFound, "append after delete")?;
    let second = ctx.client.clone().delete_session(delete()).await;
    expect(
        matches!(&second, Ok(r) if !r.get_ref().deleted) || matches!(&second, Err(s) if s.code() == Code::NotFound),
        || format!("a second delete: {second:?}"),
    )
}

async fn touch_extends_the_lifetime(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    // Longer than Redis's one-second TTL resolution, so an expiry that did not move shows as one that did not.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let touch = TouchSessionRequest { session_id: s.id.clone(), user_id: ctx.user("a") };
    let expires = ctx.client.clone().touch_session(touch).await.map_err(|e| e.to_string())?.into_inner().expires_at_ms;
    expect(expires >= s.expires_at_ms + 900, || format!("touch moved expiry from {} to {expires}", s.expires_at_ms))
}

async fn locks_are_exclusive_and_leased(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    let token = ctx.lock("a", &s.id, 60_000, 0).await.map_err(|e| format!("a free lock: {e}"))?;
    expect_code(ctx.lock("a", &s.id, 60_000, 100).await, Code::Aborted, "a held lock")?;
    expect(!ctx.unlock("a", &s.id, "not-the-token").await?, || "a wrong token released the lock".into())?;
    expect(ctx.unlock("a", &s.id, &token).await?, || "the holder's token did not release the lock".into())?;
    // A short lease frees the lock of a holder that never comes back; a waiter then gets it.
    ctx.lock("a", &s.id, 200, 0).await.map_err(|e| format!("relock: {e}"))?;
    let waited = ctx.lock("a", &s.id, 60_000, 5_000).await;
    expect(waited.is_ok(), || format!("the lease did not expire: {waited:?}"))
}

async fn a_lease_is_renewed_by_its_holder_only(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    let token = ctx.lock("a", &s.id, 1_000, 0).await.map_err(|e| format!("a free lock: {e}"))?;
    expect(!ctx.renew("a", &s.id, "not-the-token", 60_000).await?, || "a wrong token renewed the lock".into())?;
    expect(ctx.renew("a", &s.id, &token, 5_000).await?, || "the holder could not renew its lock".into())?;
    // Past the first lease the renewed lock still holds.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    expect_code(ctx.lock("a", &s.id, 60_000, 0).await, Code::Aborted, "a renewed lock past its first lease")?;
    expect(ctx.unlock("a", &s.id, &token).await?, || "the holder's token did not release the renewed lock".into())?;
    expect(!ctx.renew("a", &s.id, &token, 5_000).await?, || "a released lock was renewed".into())
}

async fn concurrent_updates_each_apply_in_full(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    // Three kinds of update, each setting one field, 24 at once: none may undo another.
    let updates = (0..8).flat_map(|_| {
        let base = UpdateSessionRequest { session_id: s.id.clone(), user_id: ctx.user("a"), ..Default::default() };
        [
            UpdateSessionRequest { system_prompt: Some("Be brief.".into()), ..base.clone() },
            UpdateSessionRequest {
                metadata: [("topic".into(), "tests".into())].into(),
                set_metadata: true,
                ..base.clone()
            },
            UpdateSessionRequest { ttl_seconds: Some(1234), ..base },
        ]
    });
    let results = futures::future::join_all(updates.map(|u| {
        let mut client = ctx.client.clone();
        async move { client.update_session(u).await }
    }))
    .await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return Err(format!("a concurrent update failed: {e}"));
    }
    let got = ctx.get("a", &s.id).await.map_err(|e| e.to_string())?;
    let topic = got.metadata.get("topic").map(String::as_str);
    expect(got.system_prompt == "Be brief." && topic == Some("tests") && got.ttl_seconds == 1234, || {
        format!("an update was lost: {got:?}")
    })
}

async fn settings_are_kept_and_updated(ctx: Ctx) -> Outcome {
    let metadata: std::collections::HashMap<String, String> = [("topic".into(), "tests".into())].into();
    let request = CreateSessionRequest {
        user_id: ctx.user("a"),
        metadata: metadata.clone(),
        system_prompt: "Be brief.".into(),
        ttl_seconds: 600,
        ..Default::default()
    };
    let s = ctx.client.clone().create_session(request).await.map_err(|e| format!("create: {e}"))?.into_inner();
    let got = ctx.get("a", &s.id).await.map_err(|e| e.to_string())?;
    expect(got.metadata == metadata && got.system_prompt == "Be brief." && got.ttl_seconds == 600, || {
        format!("settings at creation: {got:?}")
    })?;
    expect(got.expires_at_ms <= now_ms() + 600_000 + 5_000, || "the session's own TTL is not used".into())?;
    // Only what is set changes; the metadata is replaced as a whole.
    let patch = UpdateSessionRequest {
        session_id: s.id.clone(),
        user_id: ctx.user("a"),
        metadata: [("stage".into(), "two".into())].into(),
        set_metadata: true,
        system_prompt: None,
        ttl_seconds: Some(1200),
    };
    let updated = ctx.client.clone().update_session(patch.clone()).await.map_err(|e| format!("update: {e}"))?;
    let updated = updated.into_inner();
    let stage_two = updated.metadata.get("stage").map(String::as_str) == Some("two") && updated.metadata.len() == 1;
    expect(stage_two && updated.system_prompt == "Be brief." && updated.ttl_seconds == 1200, || {
        format!("after the update: {updated:?}")
    })?;
    expect(updated.expires_at_ms > got.expires_at_ms, || "the new TTL did not restart the lifetime".into())?;
    let foreign = UpdateSessionRequest { user_id: ctx.user("intruder"), ..patch.clone() };
    expect_code(ctx.client.clone().update_session(foreign).await, Code::NotFound, "an update by another user")?;
    let too_long = UpdateSessionRequest { ttl_seconds: Some(u64::MAX), ..patch };
    expect_code(ctx.client.clone().update_session(too_long).await, Code::InvalidArgument, "an absurd TTL")
}

async fn message_token_counts_are_kept(ctx: Ctx) -> Outcome {
    let s = ctx.create("a", "").await?;
    let message = ChatMessage { role: "user".into(), content: "two words".into(), tokens: 2, ..Default::default() };
    let request = AppendMessagesRequest { session_id: s.id.clone(), user_id: ctx.user("a"), messages: vec![message] };
    ctx.client.clone().append_messages(request).await.map_err(|e| e.to_string())?;
    let got = ctx.get("a", &s.id).await.map_err(|e| e.to_string())?;
    expect(got.messages.first().is_some_and(|m| m.tokens == 2), || format!("{got:?}"))
}

const CHECKS: &[(&str, Check)] = &[
    ("fresh sessions are empty, owned and unguessable", |c| {
        Box::pin(fresh_sessions_are_empty_owned_and_unguessable(c))
    }),
    ("chosen ids are kept and unique per user", |c| Box::pin(chosen_ids_are_kept_and_unique_per_user(c))),
    ("bad ids are invalid arguments", |c| Box::pin(bad_ids_are_invalid_arguments(c))),
    ("missing sessions are not found", |c| Box::pin(missing_sessions_are_not_found(c))),
    ("another user's session is not found everywhere", |c| Box::pin(another_users_session_is_not_found_everywhere(c))),
    ("appends keep order, roles and counts", |c| Box::pin(appends_keep_order_roles_and_counts(c))),
    ("bad appends change nothing", |c| Box::pin(bad_appends_change_nothing(c))),
    ("concurrent appends never interleave", |c| Box::pin(concurrent_appends_never_interleave(c))),
    ("messages page from the oldest", |c| Box::pin(messages_page_from_the_oldest(c))),
    ("lists are mine, newest first and paged", |c| Box::pin(lists_are_mine_newest_first_and_paged(c))),
    ("deleted sessions are gone", |c| Box::pin(deleted_sessions_are_gone(c))),
    ("touch extends the lifetime", |c| Box::pin(touch_extends_the_lifetime(c))),
    ("locks are exclusive and leased", |c| Box::pin(locks_are_exclusive_and_leased(c))),
    ("a lease is renewed by its holder only", |c| Box::pin(a_lease_is_renewed_by_its_holder_only(c))),
    ("settings are kept and updated", |c| Box::pin(settings_are_kept_and_updated(c))),
    ("concurrent updates each apply in full", |c| Box::pin(concurrent_updates_each_apply_in_full(c))),
    ("message token counts are kept", |c| Box::pin(message_token_counts_are_kept(c))),
];

/// Runs every check against the `SessionStore` at `endpoint` (e.g. `http://127.0.0.1:50052`), presenting
/// `credential` (a deployment's `internal.service_token`).
pub async fn run(endpoint: &str, credential: &Credential) -> anyhow::Result<Vec<CheckResult>> {
    let channel = Replicas::lazy(endpoint)?.with_credential(credential);
    if let Some(down) = channel.unreachable().await.first() {
        anyhow::bail!("the session-store is not reachable: {down}");
    }
    let client = SessionStoreClient::new(channel);
    let mut results = vec![];
    for (name, check) in CHECKS {
        let prefix = format!("conf-{}", &crate::service::new_id()[..12]);
        let outcome =
            match tokio::time::timeout(Duration::from_secs(30), check(Ctx { client: client.clone(), prefix })).await {
                Ok(outcome) => outcome,
                Err(_) => Err("no answer within 30 s".into()),
            };
        results.push(CheckResult { name, outcome });
    }
    Ok(results)
}

fn now_ms() -> i64 {
    crate::backend::now_ms()
}
