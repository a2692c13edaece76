"""CMMLU-style Chinese benchmark items and unrelated Chinese QA, generated from a seed, for measuring CJK
decontamination (``benchmarks/decontam_cjk.py``) and testing it (``logic/test_decontam_cjk.py``).

Items follow CMMLU's published layout (one CSV per subject: an unnamed index column, ``Question``, ``A``-``D``,
``Answer``) or C-Eval's (``id``, ``question``, ``A``-``D``, ``answer``, ``explanation``). Unrelated text is drawn
from the same stems, topics and phrases, so it shares the boilerplate a real generated question shares with the
benchmark ("下列关于……的说法中，正确的是") without copying an item: the hard case for false positives.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS: dict[str, list[str]] = {
    "biology": ["光合作用", "细胞呼吸", "有丝分裂", "减数分裂", "DNA复制", "酶的活性", "生态系统", "基因突变"],
    "chemistry": ["化学平衡", "氧化还原反应", "电解质溶液", "有机化合物", "原子结构", "化学键", "催化剂", "酸碱中和"],
    "physics": [
        "牛顿第二定律",
        "电磁感应",
        "机械能守恒",
        "光的折射",
        "热力学第一定律",
        "万有引力",
        "简谐运动",
        "欧姆定律",
    ],
    "history": ["秦朝统一", "丝绸之路", "科举制度", "鸦片战争", "辛亥革命", "贞观之治", "郑和下西洋", "戊戌变法"],
    "economics": ["供求关系", "通货膨胀", "边际效用", "市场失灵", "货币政策", "财政赤字", "比较优势", "机会成本"],
}
# Boilerplate stems that real benchmark items and real generated questions share; `{c}` is the item's own content.
STEMS = [
    "下列关于{t}的说法中，正确的是",
    "下列关于{t}的叙述，错误的是",
    "关于{t}，{c}，以下哪一项描述最准确？",
    "在学习{t}时，{c}，这说明了什么？",
    "{c}，这一现象与{t}有关的原因是",
]
# Content words: the benchmark draws from the first half of each pool, unrelated text from the second, so the two
# share topics and boilerplate but never an item's own content.
AGENTS = [
    "研究人员",
    "一位老师",
    "某实验小组",
    "两名学生",
    "一家工厂",
    "某地政府",
    "一位农民",
    "考古学家",
    "工程师们",
    "医生",
    "某市居民",
    "一支探险队",
    "气象站",
    "博物馆",
    "图书管理员",
    "航海家",
]
ACTIONS = [
    "连续测量了",
    "仔细比较了",
    "重新设计了",
    "详细记录了",
    "意外发现了",
    "反复验证了",
    "公开展示了",
    "系统整理了",
    "长期观察了",
    "大胆改进了",
    "认真分析了",
    "首次报告了",
    "逐步调整了",
    "多次模拟了",
]
OBJECTS = [
    "三组样本的温度",
    "古代钱币的成分",
    "河流两岸的植被",
    "一座桥梁的结构",
    "城市的用电数据",
    "种子的发芽时间",
    "一份手稿的年代",
    "溶液的颜色变化",
    "小球的运动轨迹",
    "市场上的价格",
    "农田的灌溉方式",
    "星空的亮度",
    "土壤的酸碱度",
    "工人的工作时长",
    "港口的货物数量",
    "雨水的流量",
]
PHRASES = [
    "需要消耗能量",
    "只在细胞核中进行",
    "与温度无关",
    "能够提高反应速率",
    "受到多种因素的共同影响",
    "是一个可逆的过程",
    "主要发生在夜间",
    "不需要任何条件",
    "会导致总量不断减少",
    "体现了量变到质变",
    "由外部力量推动",
    "遵循守恒的规律",
    "促进了经济的发展",
    "加强了中央集权",
    "降低了生产成本",
    "改变了社会结构",
    "与压强成正比",
    "方向总是保持不变",
    "只与质量有关",
    "在真空中无法发生",
    "可以用图像直观表示",
    "必须在高温下进行",
    "是长期积累的结果",
    "取决于初始条件",
]


def _half(pool: list[str], benchmark: bool) -> list[str]:
    return pool[: len(pool) // 2] if benchmark else pool[len(pool) // 2 :]


def _content(rng: random.Random, benchmark: bool) -> str:
    agent, action = rng.choice(_half(AGENTS, benchmark)), rng.choice(_half(ACTIONS, benchmark))
    return agent + action + rng.choice(_half(OBJECTS, benchmark))


def _choice(rng: random.Random, benchmark: bool) -> str:
    """A choice of 10-17 characters, mostly its own item's (a phrase and a measured amount)."""
    amount = f"约为{rng.randint(2, 999)}{rng.choice(['千克', '摄氏度', '万人', '公里'])}"
    return rng.choice(_half(PHRASES, benchmark)) + "，" + amount


def _question(rng: random.Random, topic: str, benchmark: bool) -> str:
    return rng.choice(STEMS).format(t=topic, c=_content(rng, benchmark))


def benchmark_items(n_per_subject: int, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """``n_per_subject`` items per subject: question, choices A-D and the answer letter."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, str]]] = {}
    for subject, topics in SUBJECTS.items():
        out[subject] = [
            {
                "Question": _question(rng, rng.choice(topics), True),
                **{letter: _choice(rng, True) for letter in "ABCD"},
                "Answer": rng.choice("ABCD"),
            }
            for _ in range(n_per_subject)
        ]
    return out


def write_cmmlu(folder: Path, items: dict[str, list[dict[str, str]]]) -> list[Path]:
    """One CSV per subject in CMMLU's layout (``,Question,A,B,C,D,Answer``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for subject, rows in items.items():
        path = folder / f"{subject}.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
            for i, r in enumerate(rows):
                w.writerow([i, r["Question"], r["A"], r["B"], r["C"], r["D"], r["Answer"]])
        paths.append(path)
    return paths


def write_ceval(folder: Path, items: dict[str, list[dict[str, str]]]) -> list[Path]:
    """One CSV per subject in C-Eval's layout (``id,question,A,B,C,D,answer,explanation``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for subject, rows in items.items():
        path = folder / f"{subject}_val.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            for i, r in enumerate(rows):
                w.writerow([i, r["Question"], r["A"], r["B"], r["C"], r["D"], r["Answer"], "1. 略"])
        paths.append(path)
    return paths


def unrelated_qa(n: int, seed: int = 1) -> list[tuple[str, str]]:
    """(question, answer) pairs from the same stems, topics and phrases as the benchmark, none copied from it."""
    rng = random.Random(seed)
    topics = [t for ts in SUBJECTS.values() for t in ts]
    out = []
    for _ in range(n):
        q = _question(rng, rng.choice(topics), False) + "？" + "请说明理由。"
        a = f"答案是{rng.choice('ABCD')}。因为{_choice(rng, False)}，并且{_content(rng, False)}。"
        out.append((q, a))
    return out


def planted_qa(items: dict[str, list[dict[str, str]]], n: int, seed: int = 2) -> list[tuple[str, str, str]]:
    """(question, answer, item id) rows that copy one benchmark item each into a QA row, the way contamination
    looks: the item's question with its four choices, inside a wrapper sentence (ids ``<subject>:<row>``)."""
    rng = random.Random(seed)
    flat = [(s, i, r) for s, rows in items.items() for i, r in enumerate(rows)]
    out = []
    for subject, i, r in rng.sample(flat, n):
        q = f"请回答下面的题目：{r['Question']}？A. {r['A']} B. {r['B']} C. {r['C']} D. {r['D']}"
        out.append((q, f"正确答案是{r['Answer']}。", f"{subject}:{i + 1}"))  # ids: 1-based record numbers
    return out
