//! Which worker a job would rather go to. A worker keeps the KV blocks of the prompts it computed (prefix
//! caching), so a conversation's next turn is cheapest where its last one ran. A conversation is known by its
//! beginning (its system prompt and first user message), whether the client resends its history or a session
//! holds it. Its preferred worker is the one this dialogue-manager saw run its last turn; failing that (a new
//! conversation, or a turn that reaches another replica), the live worker that rendezvous hashing (Thaler and
//! Ravishankar, 1998) picks for it, the same on every replica: different conversations spread evenly, and when a
//! worker goes only its own conversations move. Workers announce themselves every two seconds.
//!
//! The same announcements say which models are served ([`Workers::lookup`]): the dialogue-manager routes a request
//! by its `model` to that model's jobs, answers an unknown model at once, and refuses a model whose workers are
//! all gone instead of queueing jobs no one takes.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use moltbot_proto::{
    common::v1::ModelCard,
    inference::v1::{GenerateRequest, generate_request::Input},
};

/// A worker neither heard announcing itself nor seen starting a job for this long is gone (three announcements
/// missed).
const FORGET_AFTER: Duration = Duration::from_secs(7);
/// Conversations whose last worker is remembered; past this, the memory starts over.
const REMEMBERED: usize = 100_000;

fn hasher() -> impl Hasher {
    // SipHash with fixed keys: the same on every dialogue-manager replica.
    #[allow(deprecated)]
    std::hash::SipHasher::new_with_keys(0x6166_6669_6e69_7479, 0x006d_6f6c_7462_6f74)
}

/// Whether a request continues a conversation (an answer follows its first user message). Only such turns
/// prefer a worker: a first turn has nothing cached anywhere, and many users open with the same words, so it goes
/// wherever a slot is free (and where it ran is remembered for the next turn).
pub fn follows_up(request: &GenerateRequest) -> bool {
    let Some(Input::Chat(chat)) = &request.input else { return false };
    let first_user = chat.messages.iter().position(|m| m.role == "user");
    first_user.is_some_and(|at| chat.messages[at..].iter().any(|m| m.role == "assistant"))
}

/// What identifies a conversation: its leading system messages and first user message. `None` for a raw text
/// prompt or a chat without a user message.
pub fn conversation_key(request: &GenerateRequest) -> Option<u64> {
    let Some(Input::Chat(chat)) = &request.input else { return None };
    let first_user = chat.messages.iter().position(|m| m.role == "user")?;
    let mut h = hasher();
    request.model.hash(&mut h);
    for m in &chat.messages[..=first_user] {
        m.role.hash(&mut h);
        m.content.hash(&mut h);
    }
    Some(h.finish())
}

/// The live workers of each model, and where conversations last ran.
#[derive(Clone, Default)]
pub struct Workers {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    /// Model → worker → when it was last heard from.
    seen: HashMap<String, HashMap<String, Instant>>,
    /// Conversation → the worker that started its last turn.
    last: HashMap<u64, String>,
    /// Model name → what its workers last announced of it; kept after they are gone.
    cards: HashMap<String, ModelCard>,
}

/// What the registry knows of a model.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// At least one live worker serves it.
    Live(ModelCard),
    /// Workers served it, and all are gone.
    Gone(ModelCard),
    /// No worker ever announced it.
    Unknown,
}

impl Workers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().expect("the registry lock is never poisoned")
    }

    /// `worker` started conversation `key`'s turn just now.
    pub fn ran(&self, model: &str, worker: &str, key: Option<u64>) {
        self.saw(model, worker);
        if let Some(key) = key {
            let mut registry = self.lock();
            if registry.last.len() >= REMEMBERED {
                registry.last.clear();
            }
            registry.last.insert(key, worker.to_owned());
        }
    }

    /// `worker` of `model` is alive now.
    pub fn saw(&self, model: &str, worker: &str) {
        let mut registry = self.lock();
        let workers = registry.seen.entry(model.to_owned()).or_default();
        match workers.get_mut(worker) {
            Some(at) => *at = Instant::now(),
            None => {
                workers.insert(worker.to_owned(), Instant::now());
            }
        }
    }

    /// `worker` announced that it serves `card`.
    pub fn announced(&self, card: &ModelCard, worker: &str) {
        self.saw(&crate::subject_token(&card.id), worker);
        let mut registry = self.lock();
        if registry.cards.get(&card.id) != Some(card) {
            registry.cards.insert(card.id.clone(), card.clone());
        }
    }

    /// Whether any worker of model `id` was heard from lately.
    fn live(registry: &Registry, id: &str) -> bool {
        let workers = registry.seen.get(&crate::subject_token(id));
        workers.is_some_and(|w| w.values().any(|at| at.elapsed() < FORGET_AFTER))
    }

    /// What is known of model `id`.
    pub fn lookup(&self, id: &str) -> Lookup {
        let registry = self.lock();
        match registry.cards.get(id) {
            Some(card) if Self::live(&registry, id) => Lookup::Live(card.clone()),
            Some(card) => Lookup::Gone(card.clone()),
            None => Lookup::Unknown,
        }
    }

    /// The models a live worker serves, by name.
    pub fn models(&self) -> Vec<ModelCard> {
        let registry = self.lock();
        let mut cards: Vec<ModelCard> =
            registry.cards.values().filter(|card| Self::live(&registry, &card.id)).cloned().collect();
        cards.sort_by(|a, b| a.id.cmp(&b.id));
        cards
    }

    /// `worker` is gone (nothing listens for its offers).
    pub fn forget(&self, model: &str, worker: &str) {
        if let Some(workers) = self.lock().seen.get_mut(model) {
            workers.remove(worker);
        }
    }

    /// The worker conversation `key` prefers: where its last turn ran, if that worker is alive, else the live
    /// worker with the highest hash of (key, worker).
    pub fn preferred(&self, model: &str, key: u64) -> Option<String> {
        let mut registry = self.lock();
        let Registry { seen, last, .. } = &mut *registry;
        let workers = seen.get_mut(model)?;
        workers.retain(|_, at| at.elapsed() < FORGET_AFTER);
        if let Some(worker) = last.get(&key).filter(|w| workers.contains_key(*w)) {
            return Some(worker.clone());
        }
        workers
            .keys()
            .max_by_key(|worker| {
                let mut h = hasher();
                key.hash(&mut h);
                worker.hash(&mut h);
                h.finish()
            })
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use moltbot_proto::{common::v1::ChatMessage, inference::v1::ChatInput};

    use super::*;

    fn chat(messages: &[(&str, &str)]) -> GenerateRequest {
        GenerateRequest {
            model: "m".into(),
            input: Some(Input::Chat(ChatInput {
                messages: messages
                    .iter()
                    .map(|(role, content)| ChatMessage {
                        role: (*role).into(),
                        content: (*content).into(),
                        ..Default::default()
                    })
                    .collect(),
                tools: None,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn every_turn_of_a_conversation_has_its_key_and_other_conversations_differ() {
        let second =
            chat(&[("system", "Be brief."), ("user", "Hi, I am Ann."), ("assistant", "Hello!"), ("user", "Bye")]);
        let third = chat(&[
            ("system", "Be brief."),
            ("user", "Hi, I am Ann."),
            ("assistant", "Hello!"),
            ("user", "Bye"),
            ("assistant", "Bye!"),
            ("user", "?"),
        ]);
        let other = chat(&[("system", "Be brief."), ("user", "Hi, I am Bob."), ("assistant", "Hi"), ("user", "Bye")]);
        let first = chat(&[("system", "Be brief."), ("user", "Hi, I am Ann.")]);
        assert!(conversation_key(&first).is_some());
        assert_eq!(conversation_key(&first), conversation_key(&second));
        assert_eq!(conversation_key(&second), conversation_key(&third));
        assert_ne!(conversation_key(&second), conversation_key(&other));
        assert_eq!(conversation_key(&chat(&[("system", "no user yet")])), None);
        // A first turn has no preference: many users open alike, and nothing of it is cached yet.
        assert!(!follows_up(&first) && follows_up(&second) && follows_up(&third));
    }

    #[test]
    fn a_key_keeps_its_worker_and_only_a_gone_workers_keys_move() {
        let workers = Workers::default();
        for w in ["a", "b", "c"] {
            workers.saw("m", w);
        }
        let before: Vec<String> = (0..300).map(|k| workers.preferred("m", k).unwrap()).collect();
        // Spread: each worker gets a fair share.
        for w in ["a", "b", "c"] {
            let n = before.iter().filter(|p| *p == w).count();
            assert!((60..=140).contains(&n), "{w} got {n} of 300");
        }
        workers.forget("m", "b");
        for (k, was) in before.iter().enumerate() {
            let now = workers.preferred("m", k as u64).unwrap();
            if was != "b" {
                assert_eq!(&now, was, "key {k} moved though its worker stayed");
            }
        }
        assert_eq!(workers.preferred("other model", 1), None);
        // Where a conversation last ran wins while that worker lives.
        let elsewhere = if before[7] == "a" { "c" } else { "a" };
        workers.ran("m", elsewhere, Some(7));
        assert_eq!(workers.preferred("m", 7).unwrap(), elsewhere);
        workers.forget("m", elsewhere);
        assert_ne!(workers.preferred("m", 7).unwrap(), elsewhere);
    }

    #[test]
    fn models_are_live_while_a_worker_announces_them_and_gone_after() {
        let workers = Workers::default();
        let card = |id: &str| ModelCard { id: id.into(), context_length: 8, ..Default::default() };
        assert_eq!(workers.lookup("a.b"), Lookup::Unknown);
        workers.announced(&card("a.b"), "w1");
        workers.announced(&card("c"), "w2");
        assert_eq!(workers.lookup("a.b"), Lookup::Live(card("a.b")));
        assert_eq!(workers.models().iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["a.b", "c"]);
        // The worker's name is a subject token: a name NATS cannot carry still finds its workers.
        workers.forget(&crate::subject_token("a.b"), "w1");
        assert_eq!(workers.lookup("a.b"), Lookup::Gone(card("a.b")));
        assert_eq!(workers.models().len(), 1);
        workers.announced(&card("a.b"), "w3");
        assert!(matches!(workers.lookup("a.b"), Lookup::Live(_)));
        assert_eq!(workers.lookup("nope"), Lookup::Unknown);
    }
}
