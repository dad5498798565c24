#!/usr/bin/env python3
"""The audit's factor rules (ARCHITECTURE.md section 7) in plain Python with `re`: the peer that
`bench/audit.sh` runs against `safetune audit` on the same file. It mirrors
crates/data/src/factors.rs rule for rule and prints the same counts, so the benchmark can check
both programs agree before it compares their speed.

Usage: python3 bench/audit_rules.py FILE.jsonl
"""
import json
import re
import sys

# ---- structure -------------------------------------------------------------------------------
BULLETS = "-*+•◦▪‣●–"


def list_marker_len(line):
    t = line.lstrip()
    indent = len(line) - len(t)
    if not t:
        return None
    c = t[0]
    if c in BULLETS:
        end = 1
    elif "0" <= c <= "9":
        digits = len(t) - len(t.lstrip("0123456789"))
        if digits > 3 or digits >= len(t) or t[digits] not in ".)":
            return None
        end = digits + 1
    else:
        return None
    rest = t[end:]
    spaces = len(rest) - len(rest.lstrip(" \t"))
    if spaces == 0 or not rest.strip():
        return None
    return indent + end + spaces


def is_heading(line):
    t = line.lstrip()
    if len(line) - len(t) > 3:
        return False
    h = len(t) - len(t.lstrip("#"))
    return 1 <= h <= 6 and t[h:h + 1] in (" ", "\t") and bool(t[h:].strip())


def is_fence(line):
    t = line.lstrip()
    return t.startswith("```") or t.startswith("~~~")


def is_table_separator(line):
    t = line.strip()
    if "-" not in t or "|" not in t or any(c not in "|-: \t" for c in t):
        return False
    return all(len(c.strip().strip(":")) >= 2 for c in t.split("|") if c.strip())


def strong_outside_code(text):
    for marker in ("**", "__"):
        rest = text
        while True:
            o = rest.find(marker)
            if o < 0:
                break
            after = rest[o + 2:]
            c = after.find(marker)
            if c < 0:
                break
            inner = after[:c]
            if inner and not inner[0].isspace() and not inner[-1].isspace() and "\n" not in inner:
                return True
            rest = after[c:]
            if not inner:
                rest = rest[2:]
    return False


def has_strong_emphasis(text):
    if "**" not in text and "__" not in text:
        return False
    if "`" in text:
        return strong_outside_code(" ".join(text.split("`")[::2]))
    return strong_outside_code(text)


def lines(text):
    # Rust's str::lines: split on \n, drop one trailing \r per line, no final empty line.
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [l[:-1] if l.endswith("\r") else l for l in out]


PLAIN, ITEMIZED, MARKDOWN = 0, 1, 2


def structure_of(text):
    items = 0
    prev_table = False
    for line in lines(text):
        if is_heading(line) or is_fence(line):
            return MARKDOWN
        if prev_table and is_table_separator(line):
            return MARKDOWN
        prev_table = "|" in line.strip()
        if list_marker_len(line) is not None:
            items += 1
    if has_strong_emphasis(text):
        return MARKDOWN
    return ITEMIZED if items >= 2 else PLAIN


# ---- identity --------------------------------------------------------------------------------
ID_ADJ = r"(?:(?:large|helpful|friendly|virtual|artificial|digital|conversational|text-based|powerful|honest|harmless|simple|general-purpose|open-source|small|multilingual|ai|ai-powered|ai-based|automated|computer|machine|neural|generative|smart|intelligent|responsible|safe|chat|chat-based|llm-based|trained|advanced|personal|just|only|merely|simply|mere)[,]?\s+){0,4}"
ID_NOUN = r"(?:ai|a\.i\.|artificial\s+intelligence|assistant|language\s+model|llm|chatbot|chat\s*bot|bot|computer\s+program|machine\s+learning\s+model|virtual\s+agent)"
ARTICLE = r"(?:an?|the|your)\s+"
BE = r"(?:i\s+am|i['’]m|i\s+was|being)"
IDENTITY_RE = re.compile(
    rf"\b(?:as\s+{ARTICLE}{ID_ADJ}{ID_NOUN}|{BE}\s+(?:just\s+|only\s+|merely\s+|simply\s+)?{ARTICLE}{ID_ADJ}{ID_NOUN}|(?:i\s+am|i['’]m)\s+[a-z][\w-]*,\s+{ARTICLE}{ID_ADJ}{ID_NOUN})\b",
    re.I,
)
HUMAN_COMPOUNDS = set("""researcher researchers engineer engineers expert experts ethicist developer developers
scientist scientists professor manager director coach editor teacher instructor lecturer enthusiast specialist
consultant analyst practitioner company startup policy lab team student principal producer coordinator nurse
secretary attorney investor hobbyist user writer company's ethics safety governance regulation law course
class""".split())


def has_identity(text):
    for m in IDENTITY_RE.finditer(text):
        tail = text[m.end():]
        stripped = tail.lstrip(" \t-")
        word = ""
        for c in stripped:
            if c.isalnum() or c == "'":
                word += c
            else:
                break
        if not (tail[:1] in (" ", "-") and word.lower() in HUMAN_COMPOUNDS):
            return True
    return False


# ---- role-play -------------------------------------------------------------------------------
PERSONA = r"(?P<p>(?:(?:an?|the|my|our|some|someone|somebody)\b|(?-i:[A-Z][\w'-]+),\s+(?:an?|the)\b)[^.;:!?\n]{0,80})"
AI_PERSONA_RE = re.compile(r"\b(?:ai|a\.i\.|assistant|language\s+model|llm|chatbot|chat\s*bot|model|artificial\s+intelligence)\b", re.I)
ALTER_EGO_RE = re.compile(r"\b(?:unrestricted|unfiltered|uncensored|jailbroken|jailbreak|no\s+(?:rules|restrictions|limits|limitations|filters|guidelines|ethics|morals)|without\s+(?:any\s+)?(?:rules|restrictions|limits|limitations|filters|guidelines|ethics|morals|censorship)|do\s+anything\s+now|developer\s+mode|dan\b|evil|amoral|stay\s+in\s+character)", re.I)
IDIOM_NOUNS = set("""genius lifesaver life star legend gem hero angel saint champ godsend best great big huge real true
good wonderful amazing awesome rockstar treasure blessing one only first winner boss sweetheart darling dear natural
pro beast machine man champion wizard""".split())
FORMAT_NOUNS = set("""list table json object paragraph summary sentence single bulleted numbered essay poem haiku song
story code markdown csv yaml string number whole short brief one few series step block function script question tweet
letter email report plain valid python dictionary""".split())
LEAD = r"(?:^|[.!?:;\n]\s*|\bplease,?\s+|\byou\s+to\s+|\byou\s+(?:will|should|must|shall|can|could|would)\s+|\bcan\s+you\s+|\bcould\s+you\s+|\bwill\s+you\s+|\bnow,?\s+"
RULES = [
    ("act-as", LEAD + r")(?:act|behave)\s+(?:as|like)\s+(?:if\s+you\s+were\s+|though\s+you\s+were\s+)?" + PERSONA, True),
    ("pretend", LEAD + r"|\band\s+|\bjust\s+)pretend\s+(?:to\s+be|you\s+are|you['’]re|that\s+you\s+are|that\s+you['’]re|you\s+were|to\s+act)\b", False),
    ("lets-pretend", r"\blet['’]?s\s+(?:pretend|roleplay|role-play|role\s+play|play\s+a\s+game\s+where\s+you)\b", False),
    ("imagine-you-are", r"\b(?:imagine|suppose|assume)\s+(?:that\s+)?(?:you\s+are|you['’]re|you\s+were)\s+(?:now\s+)?" + PERSONA, True),
    ("roleplay-as", r"\brole[-\s]?play(?:ing)?\s+(?:as|with\s+me\s+as)\b", False),
    ("play-the-role", r"\b(?:play|take\s+on|assume|adopt|step\s+into)\s+(?:the\s+)?(?:role|part|persona|character)\s+of\b", False),
    ("adopt-persona", r"\b(?:adopt|take\s+on|assume|use)\s+(?:the\s+|a\s+)?persona\b", False),
    ("from-now-on", r"\bfrom\s+now\s+on,?\s+(?:you\s+are|you['’]re|you\s+will\s+be|you['’]ll\s+be|you\s+will\s+act|act)\b", False),
    ("impersonate", r"\bimpersonate\s+(?:an?|the|my|our)?\b", False),
    ("stay-in-character", r"\b(?:stay|remain)\s+in\s+character\b", False),
    ("you-are", r"(?:^|[.!?:;\n]\s*|\bnow,?\s+|\btoday,?\s+|\bhere,?\s+)(?:you\s+are|you['’]re)\s+(?:now\s+|going\s+to\s+be\s+|to\s+be\s+)?" + PERSONA, True),
    ("you-will-be", r"\byou\s+(?:will|shall|are\s+going\s+to)\s+(?:be|play|act\s+as|become)\s+" + PERSONA, True),
    ("respond-as", r"\b(?:respond|answer|reply|speak|talk|write|explain)\s+(?:to\s+me\s+)?(?:as|like)\s+(?:if\s+you\s+were\s+|though\s+you\s+were\s+)?" + PERSONA, True),
]
RULES = [(n, re.compile(p, re.I), c) for n, p, c in RULES]
NP_SEPS = [" that ", " who ", " which ", " with ", " for ", " to ", " in ", " on ", " from ", ". "]


def persona_is_roleplay(rule, phrase):
    if ALTER_EGO_RE.search(phrase):
        return True
    low = phrase.lower()
    ends = [low.find(s) for s in NP_SEPS if low.find(s) >= 0]
    np = phrase[: min(ends)] if ends else phrase
    if AI_PERSONA_RE.search(np):
        return False
    words = [re.sub(r"^\W+|\W+$", "", w).lower() for w in np.split()[1:]]
    words = [w for w in words if w]
    if not words:
        return False
    first = words[0]
    if rule == "respond-as" and first in FORMAT_NOUNS:
        return False
    if rule in ("you-are", "act-as") and len(words) <= 3 and (first in IDIOM_NOUNS or words[-1] in IDIOM_NOUNS):
        return False
    if rule == "act-as" and first in FORMAT_NOUNS:
        return False
    return True


def has_roleplay(text):
    for _name, rx, check in RULES:
        for m in rx.finditer(text):
            if check and not persona_is_roleplay(_name, m.group("p") or ""):
                continue
            return True
    return False


AFFIRMATIVE_RE = re.compile(r"""^[\s"'“*_>#-]*(?:sure\b|certainly\b|of\s+course\b|absolutely\b|definitely\b|gladly\b|okay\b|ok\b|alright\b|yes\b|great\s+question|good\s+question|here\s+(?:is|are)\b|here['’]s\b|i['’]d\s+be\s+(?:happy|glad)\s+to|i\s+would\s+be\s+(?:happy|glad)\s+to|happy\s+to\s+help|no\s+problem)""", re.I)


def main():
    path = sys.argv[1]
    n = 0
    structure = [0, 0, 0]
    identity = roleplay = affirmative = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            s = PLAIN
            ident = False
            rp = False
            aff = None
            for m in rec["messages"]:
                role, content = m["role"], m["content"]
                if role == "assistant":
                    s = max(s, structure_of(content))
                    ident = ident or has_identity(content)
                    if aff is None:
                        aff = bool(AFFIRMATIVE_RE.search(content))
                elif not rp and has_roleplay(content):
                    rp = True
            n += 1
            structure[s] += 1
            identity += ident
            roleplay += rp
            affirmative += bool(aff)
    print(json.dumps({"examples": n, "plain": structure[0], "itemized": structure[1], "markdown": structure[2],
                      "identity": identity, "roleplay": roleplay, "affirmative": affirmative}))


if __name__ == "__main__":
    main()
