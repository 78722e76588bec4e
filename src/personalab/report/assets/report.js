"use strict";
// The run report's behaviour: run picker, sortable tables, answers and pairs viewers.
// Each run's data is a JSON block parsed the first time the run is shown; rows are rendered
// a page at a time, so a run with 100,000 answers opens as fast as a small one.

const PAGE = 50;
const TABLE_ROWS = 200;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number" && !Number.isInteger(value)) return String(Number(value.toPrecision(6)));
  return String(value);
}

function key(value) {
  return value === null || value === undefined ? "none" : String(value);
}

function byValue(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return -1;
  if (b === null || b === undefined) return 1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function pager(total, page, size, onPage) {
  const pages = Math.max(1, Math.ceil(total / size));
  return el("div", { class: "pager" },
    el("button", { type: "button", onclick: () => onPage(page - 1), ...(page === 0 ? { disabled: "" } : {}) }, "previous"),
    ` page ${page + 1} of ${pages} `,
    el("button", { type: "button", onclick: () => onPage(page + 1), ...(page + 1 >= pages ? { disabled: "" } : {}) }, "next"));
}

// ---- tables ---------------------------------------------------------------------------------

function renderTable(holder, table) {
  let order = null, descending = false, all = false;
  function draw() {
    const rows = table.rows.map((row, i) => [row, i]);
    if (order !== null) rows.sort((a, b) => (descending ? -1 : 1) * byValue(a[0][order], b[0][order]) || a[1] - b[1]);
    const shown = all ? rows : rows.slice(0, TABLE_ROWS);
    const head = el("tr", {}, ...table.columns.map((name, i) => el("th", {
      class: "sortable" + (order === i ? (descending ? " desc" : " asc") : ""),
      title: "sort", onclick: () => { descending = order === i ? !descending : false; order = i; draw(); },
    }, name)));
    const body = shown.map(([row]) => el("tr", {}, ...row.map((v) => el("td", typeof v === "number" ? { class: "num" } : {}, fmt(v)))));
    holder.replaceChildren(el("table", { class: "data" }, el("thead", {}, head), el("tbody", {}, ...body)));
    if (!all && rows.length > TABLE_ROWS) {
      holder.append(el("button", { type: "button", onclick: () => { all = true; draw(); } }, `show all ${rows.length} rows`));
    }
  }
  draw();
}

// ---- answers --------------------------------------------------------------------------------

function answerRows(data) {
  const f = data.fields, interned = new Set(Object.keys(data.values));
  return data.rows.map((row, index) => {
    const answer = { index, scores: {} };
    f.forEach((name, i) => { answer[name] = interned.has(name) ? data.values[name][row[i]] : row[i]; });
    data.scores.forEach((label, i) => { answer.scores[label] = row[f.length + i]; });
    answer.haystack = (answer.question + "\n" + answer.instruction + "\n" + answer.text + "\n" + answer.condition).toLowerCase();
    return answer;
  });
}

function distinct(rows, field) {
  return [...new Set(rows.map((r) => r[field]))].sort(byValue);
}

function scoreLine(answer) {
  return Object.entries(answer.scores).map(([label, v]) => `${label} ${v === null ? "—" : fmt(Math.round(v * 10) / 10)}`).join(" · ");
}

function answerCard(answer, fields) {
  const facts = [];
  if (fields.includes("alpha") && answer.layer === null && answer.alpha === 0) facts.push("unsteered");
  else {
    if (fields.includes("layer")) facts.push(`layer ${key(answer.layer)}`);
    if (fields.includes("alpha")) facts.push(`alpha ${key(answer.alpha)}`);
  }
  if (answer.sample !== null && answer.sample !== undefined) facts.push(`sample ${answer.sample}`);
  if (fields.includes("condition") && answer.condition) facts.push(answer.condition);
  if (fields.includes("model")) facts.push(answer.model);
  const scores = scoreLine(answer);
  return el("article", { class: "answer", "data-index": answer.index },
    el("div", { class: "facts" }, facts.join(" · "), scores ? el("span", { class: "scores" }, scores) : null),
    answer.instruction ? el("div", { class: "instruction" }, el("b", {}, "instruction "), answer.instruction) : null,
    answer.question ? el("div", { class: "question" }, el("b", {}, "question "), answer.question) : null,
    el("pre", { class: "text" }, answer.text));
}

function answersViewer(holder, data) {
  const rows = answerRows(data);
  const dims = ["layer", "alpha", "condition", "model"].filter((f) => distinct(rows, f).length > 1);
  const state = { text: "", score: data.scores[0] || "", min: "", max: "", side: "", page: 0 };
  dims.forEach((f) => { state[f] = ""; });
  const controls = el("div", { class: "controls" });
  const count = el("span", { class: "count" });
  const list = el("div", { class: "list" });
  holder.replaceChildren(controls, count, list);

  function select(name, options, labels) {
    const node = el("select", { name, onchange: () => { state[name] = node.value; state.page = 0; draw(); } },
      ...options.map((value, i) => el("option", { value }, labels ? labels[i] : value)));
    node.value = state[name];
    return el("label", {}, `${name} `, node);
  }
  for (const f of dims) {
    const values = distinct(rows, f).map(key);
    controls.append(select(f, ["", ...values], ["all", ...values]));
  }
  if (data.scores.length) {
    controls.append(select("score", data.scores));
    for (const bound of ["min", "max"]) {
      const input = el("input", { type: "number", name: bound, step: "any", placeholder: bound, class: "bound",
        oninput: () => { state[bound] = input.value; state.page = 0; draw(); } });
      controls.append(input);
    }
  }
  let timer = null;
  const search = el("input", { type: "search", name: "text", placeholder: "search question, instruction, answer",
    oninput: () => { clearTimeout(timer); timer = setTimeout(() => { state.text = search.value.toLowerCase(); state.page = 0; draw(); }, 120); } });
  controls.append(search);
  const sides = ["alpha", "condition", "model"].filter((f) => dims.includes(f));
  if (sides.length) controls.append(select("side", ["", ...sides], ["one by one", ...sides.map((f) => `side by side across ${f}`)]));

  function keep(answer) {
    for (const f of dims) {
      if (state[f] === "" || key(answer[f]) === state[f]) continue;
      if (f === "layer" && state.side === "alpha" && answer.layer === null) continue;
      return false;
    }
    if (state.score && (state.min !== "" || state.max !== "")) {
      const s = answer.scores[state.score];
      if (s === null || s === undefined) return false;
      if (state.min !== "" && s < Number(state.min)) return false;
      if (state.max !== "" && s > Number(state.max)) return false;
    }
    return !state.text || answer.haystack.includes(state.text);
  }

  function draw() {
    const shown = rows.filter(keep);
    count.textContent = `${shown.length} of ${rows.length} answers`;
    holder.dataset.matching = shown.length;
    if (state.side) drawSideBySide(shown);
    else {
      const page = shown.slice(state.page * PAGE, (state.page + 1) * PAGE);
      list.replaceChildren(...page.map((a) => answerCard(a, dims)),
        pager(shown.length, state.page, PAGE, (p) => { state.page = p; draw(); }));
    }
  }

  function drawSideBySide(shown) {
    const column = state.side;
    const rest = ["question", "instruction", "layer", "alpha", "sample", "condition", "model"].filter((f) => f !== column);
    const layers = distinct(shown.filter((a) => a.layer !== null), "layer");
    const columns = distinct(shown, column);
    const groups = new Map();
    function add(answer, layer) {
      const id = JSON.stringify(rest.map((f) => (f === "layer" ? layer : answer[f])));
      if (!groups.has(id)) groups.set(id, { first: answer, layer, cells: new Map() });
      const cells = groups.get(id).cells;
      const at = key(answer[column]);
      if (!cells.has(at)) cells.set(at, []);
      cells.get(at).push(answer);
    }
    for (const answer of shown) {
      if (column === "alpha" && answer.layer === null && layers.length) layers.forEach((l) => add(answer, l));
      else add(answer, answer.layer);
    }
    const all = [...groups.values()];
    const page = all.slice(state.page * PAGE, (state.page + 1) * PAGE);
    const head = el("tr", {}, el("th", {}, "prompt"), ...columns.map((c) => el("th", {}, `${column} ${key(c)}`)));
    const body = page.map((g) => el("tr", {},
      el("td", { class: "prompt" },
        g.first.instruction ? el("div", { class: "instruction" }, g.first.instruction) : null,
        el("div", { class: "question" }, g.first.question),
        el("div", { class: "facts" }, rest.filter((f) => dims.includes(f)).map((f) => `${f} ${key(f === "layer" ? g.layer : g.first[f])}`).join(" · "),
          g.first.sample !== null && g.first.sample !== undefined ? ` · sample ${g.first.sample}` : "")),
      ...columns.map((c) => el("td", {}, ...(g.cells.get(key(c)) || []).map((a) =>
        el("div", { class: "answer" }, el("pre", { class: "text" }, a.text), el("div", { class: "scores" }, scoreLine(a))))))));
    list.replaceChildren(el("table", { class: "side" }, el("thead", {}, head), el("tbody", {}, ...body)),
      pager(all.length, state.page, PAGE, (p) => { state.page = p; draw(); }));
  }
  draw();
}

// ---- extraction pairs -----------------------------------------------------------------------

function pairsViewer(holder, pairs) {
  const rules = [...new Set(pairs.flatMap((p) => p.rules))];
  const state = { status: "", text: "", page: 0 };
  const status = el("select", { name: "status", onchange: () => { state.status = status.value; state.page = 0; draw(); } },
    el("option", { value: "" }, "all pairs"), el("option", { value: "kept" }, "kept"), el("option", { value: "dropped" }, "dropped"),
    ...rules.map((r) => el("option", { value: r }, `dropped: ${r}`)));
  const search = el("input", { type: "search", name: "text", placeholder: "search",
    oninput: () => { state.text = search.value.toLowerCase(); state.page = 0; draw(); } });
  const count = el("span", { class: "count" });
  const list = el("div", { class: "list" });
  holder.replaceChildren(el("div", { class: "controls" }, el("label", {}, "status ", status), search), count, list);
  const haystack = pairs.map((p) => [p.question, p.pos_text, p.neg_text, p.pos_instruction, p.neg_instruction].join("\n").toLowerCase());

  function keep(p, i) {
    if (state.status === "kept" && !p.kept) return false;
    if (state.status === "dropped" && p.kept) return false;
    if (state.status && state.status !== "kept" && state.status !== "dropped" && !p.rules.includes(state.status)) return false;
    return !state.text || haystack[i].includes(state.text);
  }
  function side(p, polarity) {
    return el("td", {},
      el("div", { class: "instruction" }, p[`${polarity}_instruction`] || ""),
      el("pre", { class: "text" }, p[`${polarity}_text`]),
      el("div", { class: "scores" }, `trait ${fmt(p[`${polarity}_trait`])} · coherence ${fmt(p[`${polarity}_coherence`])}`));
  }
  function draw() {
    const shown = pairs.filter(keep);
    count.textContent = `${shown.length} of ${pairs.length} pairs`;
    holder.dataset.matching = shown.length;
    const page = shown.slice(state.page * PAGE, (state.page + 1) * PAGE);
    const body = page.map((p) => el("tr", { class: "pair " + (p.kept ? "kept" : "dropped") },
      el("td", {}, el("div", { class: "question" }, p.question), el("div", { class: "facts" }, `instruction pair ${p.pair} · sample ${p.sample}`),
        el("div", { class: "verdict" }, p.kept ? "kept" : "dropped: " + p.reasons.join("; "))),
      side(p, "pos"), side(p, "neg")));
    list.replaceChildren(el("table", { class: "side" },
      el("thead", {}, el("tr", {}, el("th", {}, "pair"), el("th", {}, "positive"), el("th", {}, "negative"))), el("tbody", {}, ...body)),
      pager(shown.length, state.page, PAGE, (p) => { state.page = p; draw(); }));
  }
  draw();
}

// ---- runs -----------------------------------------------------------------------------------

const started = new Set();

function start(index) {
  if (started.has(index)) return;
  started.add(index);
  const section = document.getElementById(`run-${index}`);
  const block = document.getElementById(`data-${index}`);
  const data = JSON.parse(block.textContent);
  section.querySelectorAll("[data-table]").forEach((holder) => {
    const table = data.tables[Number(holder.dataset.table)];
    const details = holder.closest("details");
    const draw = () => { if (!holder.dataset.drawn) { holder.dataset.drawn = "1"; renderTable(holder, table); } };
    if (!details || details.open) draw();
    else details.addEventListener("toggle", draw, { once: true });
  });
  const answers = section.querySelector(".answers");
  if (answers && data.answers) answersViewer(answers, data.answers);
  const pairs = section.querySelector(".pairs");
  if (pairs && data.pairs) pairsViewer(pairs, data.pairs);
}

function show(index) {
  document.querySelectorAll("section.run").forEach((s) => { s.hidden = s.id !== `run-${index}`; });
  document.querySelectorAll("#picker a").forEach((a) => a.classList.toggle("current", a.dataset.run === String(index)));
  start(index);
  if (location.hash !== `#run-${index}`) history.replaceState(null, "", `#run-${index}`);
}

// ---- click a figure to see it at its saved size ---------------------------------------------------

function zoom(event) {
  const image = event.target.closest(".figures img, .doc img");
  if (!image) return;
  const dialog = document.getElementById("zoom");
  const large = dialog.querySelector("img");
  large.src = image.src;
  large.alt = image.alt;
  dialog.showModal();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelector("main").addEventListener("click", zoom);
  document.getElementById("zoom").addEventListener("click", (event) => event.currentTarget.close());
  document.querySelectorAll("a[data-run]").forEach((a) => a.addEventListener("click", (event) => {
    event.preventDefault();
    show(Number(a.dataset.run));
  }));
  const fromHash = /^#run-(\d+)$/.exec(location.hash);
  const first = fromHash && document.getElementById(`run-${fromHash[1]}`) ? Number(fromHash[1]) : 0;
  if (document.getElementById(`run-${first}`)) show(first);
  document.body.dataset.ready = "1";
});
