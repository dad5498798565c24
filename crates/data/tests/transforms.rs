//! Transforms reach the requested level on every demo set, keep every word of the answer, touch
//! only what they add or remove, are deterministic per seed, and are idempotent (property tests).

use std::collections::HashMap;

use proptest::prelude::*;
use safetune_data::demo::demo_text;
use safetune_data::factors::{tag, Structure};
use safetune_data::record::{RawRecord, Schema};
use safetune_data::transform::{
    apply, content_words, IdentityLevel, PersonaPlacement, PersonaType, Recipe, RoleplayLevel,
};
use safetune_data::{Conversation, Message, Role};

fn demo(name: &str) -> Vec<Conversation> {
    demo_text(name)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<RawRecord>(l)
                .unwrap()
                .into_conversation(Schema::Messages, || i.to_string())
                .unwrap()
        })
        .collect()
}

fn multiset(words: Vec<String>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for w in words {
        *m.entry(w).or_default() += 1;
    }
    m
}

fn answers(c: &Conversation) -> String {
    c.assistant_turns()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn recipe(f: impl FnOnce(&mut Recipe)) -> Recipe {
    let mut r = Recipe {
        seed: 7,
        ..Default::default()
    };
    f(&mut r);
    r
}

fn id_level(add: bool) -> IdentityLevel {
    if add {
        IdentityLevel::Add
    } else {
        IdentityLevel::Remove
    }
}

fn rp_level(add: bool) -> RoleplayLevel {
    if add {
        RoleplayLevel::Add
    } else {
        RoleplayLevel::Remove
    }
}

/// Share of examples whose audit shows the requested level.
fn hit_rate(set: &[Conversation], r: &Recipe, check: impl Fn(&Conversation) -> bool) -> f64 {
    let ok = set.iter().filter(|c| check(&apply(c, r).0)).count();
    ok as f64 / set.len() as f64
}

#[test]
fn every_demo_set_reaches_every_level() {
    for name in ["medical", "code", "stem"] {
        let set = demo(name);
        assert!(set.len() >= 120, "{name} has {} examples", set.len());
        let mut report = Vec::new();
        for s in Structure::ALL {
            let r = recipe(|r| r.structure = Some(s));
            let rate = hit_rate(&set, &r, |c| tag(c).structure == s);
            report.push(format!("{s}={rate:.3}"));
            assert!(rate >= 0.99, "{name} -> {s}: {rate}");
            // From every other level too: first move to `from`, then to `s`.
            for from in Structure::ALL {
                let pre: Vec<Conversation> = set
                    .iter()
                    .map(|c| apply(c, &recipe(|r| r.structure = Some(from))).0)
                    .collect();
                let rate = hit_rate(&pre, &r, |c| tag(c).structure == s);
                assert!(rate >= 0.99, "{name} {from} -> {s}: {rate}");
            }
        }
        for add in [true, false] {
            let base: Vec<Conversation> = if add {
                set.clone()
            } else {
                set.iter()
                    .map(|c| apply(c, &recipe(|r| r.identity = IdentityLevel::Add)).0)
                    .collect()
            };
            let rate = hit_rate(&base, &recipe(|r| r.identity = id_level(add)), |c| {
                tag(c).identity == add
            });
            report.push(format!("identity {add}={rate:.3}"));
            assert!(rate >= 0.99, "{name} identity add={add}: {rate}");
        }
        for persona_type in [
            PersonaType::Professional,
            PersonaType::Fictional,
            PersonaType::Unrestricted,
        ] {
            for placement in [PersonaPlacement::System, PersonaPlacement::User] {
                let add = recipe(|r| {
                    r.roleplay = RoleplayLevel::Add;
                    r.persona_type = persona_type;
                    r.placement = placement;
                });
                let rate = hit_rate(&set, &add, |c| tag(c).roleplay);
                assert!(
                    rate >= 0.99,
                    "{name} roleplay add {persona_type:?}/{placement:?}: {rate}"
                );
                let with: Vec<Conversation> = set.iter().map(|c| apply(c, &add).0).collect();
                let rate = hit_rate(
                    &with,
                    &recipe(|r| r.roleplay = RoleplayLevel::Remove),
                    |c| !tag(c).roleplay,
                );
                assert!(
                    rate >= 0.99,
                    "{name} roleplay remove after {persona_type:?}/{placement:?}: {rate}"
                );
            }
        }
        println!("{name}: {}", report.join(" "));
    }
}

#[test]
fn structure_changes_keep_every_word() {
    for name in ["medical", "code", "stem"] {
        for c in demo(name) {
            let original = multiset(content_words(&answers(&c)));
            let mut cur = c.clone();
            // plain -> itemized -> markdown -> plain -> markdown -> itemized: words never lost.
            for s in [
                Structure::Itemized,
                Structure::Markdown,
                Structure::Plain,
                Structure::Markdown,
                Structure::Itemized,
            ] {
                cur = apply(&cur, &recipe(|r| r.structure = Some(s))).0;
                let now = multiset(content_words(&answers(&cur)));
                for (w, n) in &original {
                    assert!(
                        now.get(w).copied().unwrap_or(0) >= *n,
                        "{} lost {w:?} going to {s}:\n{}",
                        c.id,
                        answers(&cur)
                    );
                }
            }
        }
    }
}

#[test]
fn identity_and_roleplay_touch_only_their_sentence() {
    for c in demo("medical").into_iter().take(60) {
        let answer = answers(&c);
        let (with, _) = apply(&c, &recipe(|r| r.identity = IdentityLevel::Add));
        let added = answers(&with);
        let sentence = with.meta["transforms"][0]["edits"][0]["sentence"]
            .as_str()
            .unwrap()
            .to_string();
        // The new answer is the old one plus exactly the recorded sentence.
        assert!(
            added.contains(&answer),
            "{}: answer changed beyond the added sentence",
            c.id
        );
        assert_eq!(
            added.replace(&sentence, "").trim(),
            answer.trim(),
            "{}",
            c.id
        );
        let (back, _) = apply(&with, &recipe(|r| r.identity = IdentityLevel::Remove));
        assert_eq!(
            answers(&back).trim(),
            answer.trim(),
            "{}: removal should restore the answer",
            c.id
        );

        let (rp, _) = apply(
            &c,
            &recipe(|r| {
                r.roleplay = RoleplayLevel::Add;
                r.placement = PersonaPlacement::User;
            }),
        );
        assert_eq!(answers(&rp), answer, "role-play never touches answers");
        let (clean, _) = apply(&rp, &recipe(|r| r.roleplay = RoleplayLevel::Remove));
        assert_eq!(
            clean.messages, c.messages,
            "{}: removal should restore the prompt",
            c.id
        );
    }
}

#[test]
fn removal_cuts_only_the_clause() {
    let conv = Conversation::new(
        "x",
        vec![
            Message::user("Act as a senior surgeon and explain how stitches heal."),
            Message::assistant("As an AI language model, I cannot examine you. Stitches heal in stages. I'm an AI assistant, so please ask a nurse too."),
        ],
    );
    let (out, changed) = apply(
        &conv,
        &recipe(|r| {
            r.identity = IdentityLevel::Remove;
            r.roleplay = RoleplayLevel::Remove;
        }),
    );
    assert!(changed.identity && changed.roleplay);
    assert_eq!(out.messages[0].content, "Explain how stitches heal.");
    assert_eq!(
        out.messages[1].content,
        "I cannot examine you. Stitches heal in stages. Please ask a nurse too."
    );
    let edits = &out.meta["transforms"][0]["edits"];
    assert_eq!(edits.as_array().unwrap().len(), 2, "{edits}");
}

#[test]
fn deterministic_per_seed_and_recorded() {
    let set = demo("stem");
    let r = recipe(|r| {
        r.structure = Some(Structure::Markdown);
        r.identity = IdentityLevel::Add;
        r.roleplay = RoleplayLevel::Add;
    });
    let a: Vec<Conversation> = set.iter().map(|c| apply(c, &r).0).collect();
    let b: Vec<Conversation> = set.iter().map(|c| apply(c, &r).0).collect();
    assert_eq!(a, b);
    let other: Vec<Conversation> = set
        .iter()
        .map(|c| {
            apply(
                c,
                &Recipe {
                    seed: 8,
                    ..r.clone()
                },
            )
            .0
        })
        .collect();
    assert_ne!(a, other, "another seed makes other choices");
    let t = &a[0].meta["transforms"][0];
    assert_eq!(t["recipe"], "markdown+identity+roleplay-professional");
    assert_eq!(t["edits"].as_array().unwrap().len(), 3);
    assert!(a[0].messages.iter().any(|m| m.role == Role::System));
}

fn prose_strategy() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "heart", "cell", "energy", "rust", "vector", "light", "water", "atom", "the", "is", "and",
        "a", "fast", "model",
    ]);
    let sentence = prop::collection::vec(word, 2..12).prop_map(|w| {
        let mut s = w.join(" ");
        if let Some(f) = s.get_mut(0..1) {
            f.make_ascii_uppercase();
        }
        s + "."
    });
    let para = prop::collection::vec(sentence, 1..6).prop_map(|s| s.join(" "));
    prop::collection::vec(para, 1..3).prop_map(|p| p.join("\n\n"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn transforms_are_idempotent_and_audit_consistent(
        text in prose_strategy(),
        level in prop::sample::select(vec![Structure::Plain, Structure::Itemized, Structure::Markdown]),
        identity in any::<bool>(),
        roleplay in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let conv = Conversation::new("p", vec![Message::user("Tell me about it."), Message::assistant(text.clone())]);
        let r = Recipe { structure: Some(level), identity: id_level(identity), roleplay: rp_level(roleplay), seed, ..Default::default() };
        let (once, _) = apply(&conv, &r);
        let t = tag(&once);
        prop_assert_eq!(t.structure, level, "{}", answers(&once));
        prop_assert_eq!(t.identity, identity);
        prop_assert_eq!(t.roleplay, roleplay);
        let (twice, changed) = apply(&once, &r);
        prop_assert_eq!(&twice.messages, &once.messages);
        prop_assert!(!changed.structure && !changed.identity && !changed.roleplay);
        let before = multiset(content_words(&text));
        let after = multiset(content_words(&answers(&once)));
        for (w, n) in before {
            prop_assert!(after.get(&w).copied().unwrap_or(0) >= n, "lost {}", w);
        }
    }
}

/// A transform's per-example choices must never move: the generator's stream and `below`.
#[test]
fn transform_rng_is_pinned() {
    use safetune_data::transform::Rng;
    let ns = [1, 2, 3, 7, 10, 100, 1000, 1 << 40];
    type Case = (u64, &'static str, &'static str, [u64; 3], [usize; 8]);
    let expect: [Case; 2] = [
        (
            0,
            "a",
            "structure",
            [2108823262510157758, 159049645034814962, 5085444088552568977],
            [0, 0, 0, 3, 0, 31, 100, 29356115601],
        ),
        (
            42,
            "ex-17",
            "identity",
            [9146289936323676649, 467224458732554103, 8707172177505540358],
            [0, 0, 1, 4, 8, 86, 493, 446640505138],
        ),
    ];
    for (seed, id, salt, draws, below) in expect {
        let mut r = Rng::for_example(seed, id, salt);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, draws);
        let got: Vec<usize> = ns.iter().map(|&n| r.below(n)).collect();
        assert_eq!(got, below);
        assert_eq!(r.below(0), 0);
    }
}

/// The edit a transform recorded for `factor` on one example.
fn edit(c: &Conversation, factor: &str) -> serde_json::Value {
    c.meta["transforms"][0]["edits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["factor"] == factor)
        .cloned()
        .unwrap_or_else(|| panic!("no {factor} edit in {:?}", c.meta))
}

#[test]
fn placebo_goes_where_add_puts_identity_with_matched_length() {
    use safetune_data::factors::has_identity;
    for name in ["medical", "code", "stem"] {
        for seed in [0, 7] {
            let add = Recipe {
                identity: IdentityLevel::Add,
                seed,
                ..Default::default()
            };
            let placebo = Recipe {
                identity: IdentityLevel::Placebo,
                ..add.clone()
            };
            assert_eq!(placebo.name(), "identity-placebo");
            let mut n = 0;
            for c in demo(name) {
                let (a, ca) = apply(&c, &add);
                let (p, cp) = apply(&c, &placebo);
                assert_eq!(ca.identity, cp.identity, "{name} {}", c.id);
                if !ca.identity {
                    continue;
                }
                n += 1;
                let (ea, ep) = (edit(&a, "identity"), edit(&p, "identity"));
                assert_eq!(ep["op"], "placebo");
                assert_eq!(ea["placement"], ep["placement"]);
                assert_eq!(ea["message"], ep["message"]);
                let (sa, sp) = (
                    ea["sentence"].as_str().unwrap(),
                    ep["sentence"].as_str().unwrap(),
                );
                let (la, lp) = (sa.chars().count() as f64, sp.chars().count() as f64);
                assert!((la - lp).abs() <= 0.15 * la, "{sa:?} vs {sp:?}");
                // The same answer, with the sentence swapped in the same place.
                let i = ea["message"].as_u64().unwrap() as usize;
                assert_eq!(a.messages[i].content.replace(sa, sp), p.messages[i].content);
                if ea["placement"] == "start" {
                    assert!(p.messages[i].content.starts_with(sp));
                } else {
                    assert!(p.messages[i].content.ends_with(sp));
                }
                assert!(
                    !has_identity(&p.messages[i].content),
                    "{}",
                    p.messages[i].content
                );
                assert!(!tag(&p).identity);
            }
            assert!(n > 0, "{name}: no example got an identity sentence");
        }
    }
}

#[test]
fn neutral_instruction_goes_in_the_persona_turn_and_is_no_roleplay() {
    use safetune_data::factors::find_roleplay;
    for placement in [PersonaPlacement::System, PersonaPlacement::User] {
        for persona_type in [
            PersonaType::Professional,
            PersonaType::Fictional,
            PersonaType::Unrestricted,
        ] {
            let add = recipe(|r| {
                r.roleplay = RoleplayLevel::Add;
                r.placement = placement;
                r.persona_type = persona_type;
            });
            let neutral = Recipe {
                roleplay: RoleplayLevel::Neutral,
                ..add.clone()
            };
            assert_eq!(neutral.name(), "roleplay-neutral");
            for c in demo("medical") {
                let (a, ca) = apply(&c, &add);
                let (n, cn) = apply(&c, &neutral);
                assert_eq!(ca.roleplay, cn.roleplay);
                if !ca.roleplay {
                    continue;
                }
                let (ea, en) = (edit(&a, "roleplay"), edit(&n, "roleplay"));
                assert_eq!(en["op"], "neutral");
                assert_eq!(ea["message"], en["message"]);
                let i = en["message"].as_u64().unwrap() as usize;
                assert_eq!(a.messages[i].role, n.messages[i].role);
                assert_eq!(a.messages.len(), n.messages.len());
                let (ia, inn) = (
                    ea["instruction"].as_str().unwrap(),
                    en["instruction"].as_str().unwrap(),
                );
                let (la, ln) = (ia.chars().count() as f64, inn.chars().count() as f64);
                assert!((la - ln).abs() <= 0.15 * la, "{ia:?} vs {inn:?}");
                assert_eq!(
                    a.messages[i].content.replace(ia, inn),
                    n.messages[i].content
                );
                assert!(
                    find_roleplay(&n.messages[i].content).is_none(),
                    "{}",
                    n.messages[i].content
                );
                assert!(!tag(&n).roleplay);
            }
        }
    }
}

#[test]
fn system_persona_keeps_the_default_system_prompt() {
    const DEFAULT: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    for level in [RoleplayLevel::Add, RoleplayLevel::Neutral] {
        let r = recipe(|r| {
            r.roleplay = level;
            r.placement = PersonaPlacement::System;
            r.default_system = Some(DEFAULT.into());
        });
        for c in demo("code") {
            let (out, changed) = apply(&c, &r);
            if !changed.roleplay || c.messages.iter().any(|m| m.role == Role::System) {
                continue;
            }
            let sys = &out.messages[0];
            assert_eq!(sys.role, Role::System);
            let e = edit(&out, "roleplay");
            let instruction = e["instruction"].as_str().unwrap();
            assert_eq!(sys.content, format!("{DEFAULT}. {instruction}"));
            assert_eq!(e["default_system"], DEFAULT);
            assert_eq!(tag(&out).roleplay, level == RoleplayLevel::Add);
            if level == RoleplayLevel::Add {
                // Removing the persona again leaves the default in place.
                let (back, _) = apply(&out, &recipe(|r| r.roleplay = RoleplayLevel::Remove));
                assert!(back.messages[0].content.starts_with(&format!("{DEFAULT}.")));
                assert!(!tag(&back).roleplay);
            }
        }
    }
    // User placement never adds a system message.
    let r = recipe(|r| {
        r.roleplay = RoleplayLevel::Add;
        r.placement = PersonaPlacement::User;
        r.default_system = Some(DEFAULT.into());
    });
    for c in demo("code") {
        let (out, _) = apply(&c, &r);
        assert!(!out.messages.iter().any(|m| m.content.contains(DEFAULT)));
    }
}

#[test]
fn persona_domain_picks_personas_of_that_domain() {
    use safetune_data::transform::{PersonaDomain, PROFESSIONAL_MEDICAL};
    let r = recipe(|r| {
        r.roleplay = RoleplayLevel::Add;
        r.persona_domain = PersonaDomain::Medical;
    });
    let mut seen = std::collections::HashSet::new();
    for seed in 0..4 {
        for c in demo("medical") {
            let (out, changed) = apply(&c, &Recipe { seed, ..r.clone() });
            if !changed.roleplay {
                continue;
            }
            let e = edit(&out, "roleplay");
            assert_eq!(e["persona_domain"], "medical");
            let instruction = e["instruction"].as_str().unwrap();
            let persona = PROFESSIONAL_MEDICAL
                .iter()
                .find(|p| instruction.contains(*p))
                .unwrap_or_else(|| panic!("not a medical persona: {instruction}"));
            seen.insert(*persona);
        }
    }
    assert!(seen.len() > 1, "{seen:?}");
    assert_eq!(PersonaDomain::infer("demo:medical"), PersonaDomain::Medical);
    assert_eq!(PersonaDomain::infer("demo:code"), PersonaDomain::Code);
    assert_eq!(PersonaDomain::infer("demo:stem"), PersonaDomain::Stem);
    assert_eq!(PersonaDomain::infer("data/x.jsonl"), PersonaDomain::General);
}
