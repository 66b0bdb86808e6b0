/* visionsae latent explorer: a table of every latent and a page per latent, from static files.
   Data arrive as <script> files calling VSAE.setMeta / VSAE.table / VSAE.chunk (fetch() of file:// is
   blocked by browsers, scripts are not). No library, no network. */
"use strict";
(function () {
  const S = { meta: null, tables: {}, chunks: {}, waiting: {}, ck: 0, sortKey: "rate", sortDir: -1,
              rows: [], heat: true, lat: null, vs: null };
  const ROW = 24;
  const COLS = [
    ["id", "latent", v => v], ["rate", "rate", fmtSci], ["img", "images", fmtPct], ["max", "max", fmt],
    ["mean", "mean", fmt], ["ms", "MS", fmt], ["pur", "purity", fmt], ["cls", "top class", null],
    ["up", "promotes", null]];
  const HELP = {
    id: "latent number", rate: "share of held-out rows (tokens) where it fires",
    img: "share of held-out images where it fires (on some token)", max: "largest activation on an image",
    mean: "mean activation over the images it fires on", ms: "Monosemanticity Score (Pach et al. 2025)",
    pur: "share of its top images in its most frequent class", cls: "most frequent class of the images it fires on",
    up: "class whose logit its decoder direction raises most (the backbone's classifier head)"};
  const RANGES = [["rate", "firing rate"], ["img", "images"], ["max", "max act."], ["mean", "mean act."], ["ms", "MS"],
                  ["pur", "purity"]];

  function fmt(v) { return v === null || v === undefined ? "–" : (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)); }
  function fmtSci(v) { return v === null || v === undefined ? "–" : (v === 0 ? "0" : v.toExponential(1)); }
  function fmtPct(v) { return v === null || v === undefined ? "–" : (100 * v).toPrecision(2) + "%"; }
  function esc(s) { return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]); }
  function el(tag, attrs, html) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (html !== undefined) e.innerHTML = html;
    return e;
  }
  function $(sel, root) { return (root || document).querySelector(sel); }

  function loadScript(src, onerror) {
    const s = el("script", { src: src });
    s.onerror = onerror || (() => showError("could not load " + src + " (was the report copied whole?)"));
    document.body.appendChild(s);
  }
  function showError(msg) { const b = $("#error"); if (b) { b.textContent = msg; b.hidden = false; } }

  // --- data entry points ------------------------------------------------------------------
  window.VSAE = {
    setMeta(m) { S.meta = m; start(); },
    table(ck, t) { S.tables[ck] = t; flush("t" + ck); },
    chunk(ck, c, recs) { (S.chunks[ck] = S.chunks[ck] || {})[c] = recs; flush("c" + ck + ":" + c); },
    state: S,
  };
  function flush(key) { const cbs = S.waiting[key] || []; delete S.waiting[key]; cbs.forEach(f => f()); }
  function need(key, src, ready, cb) {
    if (ready()) { cb(); return; }
    if (!S.waiting[key]) { S.waiting[key] = []; loadScript(src); }
    S.waiting[key].push(cb);
  }
  function withTable(ck, cb) { need("t" + ck, "explorer/data/c" + ck + "/table.js", () => S.tables[ck], cb); }
  function withLatent(ck, lat, cb) {
    const c = Math.floor(lat / S.meta.chunk);
    need("c" + ck + ":" + c, "explorer/data/c" + ck + "/l" + c + ".js",
         () => S.chunks[ck] && S.chunks[ck][c], () => cb(S.chunks[ck][c][lat - c * S.meta.chunk]));
  }
  function group(ck) { return S.meta.groups[S.meta.checkpoints[ck].group]; }
  function className(ck, c) { const g = group(ck); return c < 0 || c === null ? "–" : (g.classes[c] !== undefined ? g.classes[c] : String(c)); }
  function headName(ck, c) { const h = group(ck).head_classes; return h && h[c] !== undefined ? h[c] : String(c); }

  // --- page skeleton -----------------------------------------------------------------------
  function start() {
    const m = S.meta, app = $("#app");
    const opts = m.checkpoints.map((c, i) => `<option value="${i}">${esc(c.name)} (${esc(c.arch)}, k=${c.k}, ${c.n_latents} latents)</option>`).join("");
    const ranges = RANGES.map(([k, label]) => `<label class="range">${esc(label)} <input data-min="${k}" type="number" step="any" placeholder="min"> – <input data-max="${k}" type="number" step="any" placeholder="max"></label>`).join("");
    app.innerHTML = `
      <header><h1>${esc(m.title)}</h1>
        <select id="ck" title="checkpoint">${opts}</select>
        <span id="cksum"></span>
        <span class="links"><a href="report.md">report.md</a> · <a href="report.json">report.json</a>${Object.values(m.figures || {}).map(f => ` · <a href="${esc(f)}">${esc(f.replace(".png", ""))}</a>`).join("")}</span>
      </header>
      <div id="error" hidden></div>
      <main>
        <section id="list">
          <div class="controls">
            <input id="q" type="search" placeholder="latent id or class name" autocomplete="off">
            <select id="cls"><option value="">all classes</option></select>
            <label><input id="dead" type="checkbox" checked> dead</label>
            <div class="ranges">${ranges}</div>
            <div id="count"></div><div class="note">↑ / ↓: previous / next latent</div>
          </div>
          <div id="thead" class="row head"></div>
          <div id="rows"><div id="spacer"></div></div>
        </section>
        <section id="detail"><p class="hint">Choose a latent in the table (or type its number).</p></section>
      </main>`;
    $("#ck").onchange = e => { location.hash = "c=" + e.target.value; };
    $("#q").oninput = refilter;
    $("#q").onkeydown = e => { if (e.key === "Enter" && S.rows.length) location.hash = `c=${S.ck}&l=${S.rows[0]}`; };
    $("#cls").onchange = refilter;
    $("#dead").onchange = refilter;
    app.querySelectorAll(".ranges input").forEach(i => { i.oninput = refilter; });
    $("#rows").onscroll = renderRows;
    window.onresize = renderRows;
    window.onhashchange = route;
    document.onkeydown = e => {  // up / down: the previous / next latent of the table as sorted and filtered
      if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || !["ArrowUp", "ArrowDown"].includes(e.key)) return;
      const at = S.rows.indexOf(S.lat), next = S.rows[Math.max(0, Math.min(S.rows.length - 1, at + (e.key === "ArrowDown" ? 1 : -1)))];
      if (next === undefined) return;
      e.preventDefault();
      const box = $("#rows"), pos = S.rows.indexOf(next) * ROW;
      if (pos < box.scrollTop || pos > box.scrollTop + box.clientHeight - ROW) box.scrollTop = pos - box.clientHeight / 2;
      location.hash = `c=${S.ck}&l=${next}`;
    };
    route();
  }

  function parseHash() {
    const h = {};
    location.hash.replace(/^#/, "").split("&").forEach(p => { const [k, v] = p.split("="); if (k) h[k] = decodeURIComponent(v || ""); });
    return h;
  }
  function route() {
    const h = parseHash(), ck = Math.min(+(h.c || 0), S.meta.checkpoints.length - 1);
    const lat = h.l !== undefined && h.l !== "" ? +h.l : null;
    const vs = h.vs ? h.vs.split(":").map(Number) : null;
    const changed = ck !== S.ck || !S.tables[ck];
    S.ck = ck; S.lat = lat; S.vs = vs;
    $("#ck").value = String(ck);
    withTable(ck, () => {
      if (changed || !S.rows.length) setupTable();
      renderRows();
      if (!S.marked) { S.marked = true; performance.mark("vsae-table-ready"); }
      if (lat !== null) showLatent(ck, lat, vs); else $("#detail").innerHTML = `<p class="hint">Choose a latent in the table (or type its number).</p>`;
    });
  }

  // --- the table -----------------------------------------------------------------------------
  function cols() { const t = S.tables[S.ck]; return COLS.filter(c => c[0] !== "up" || t.up); }
  function setupTable() {
    const ck = S.ck, c = S.meta.checkpoints[ck], t = S.tables[ck], g = group(ck);
    $("#cksum").textContent = `${g.backbone} · layer ${g.layer} · ${g.held_out} held-out images · FVU ${fmt(c.fvu)} · L0 ${fmt(c.l0)} · ${c.dead} dead · MS ${fmt(c.ms)} (e_n: ${g.ms_encoder || "?"})`;
    const sel = $("#cls");
    sel.innerHTML = `<option value="">all classes</option>` + g.classes.map((n, i) => `<option value="${i}">${esc(n)}</option>`).join("");
    const cs = cols();
    $("#thead").innerHTML = cs.map(([k, label]) => `<span data-k="${k}" title="${esc(HELP[k])} (click to sort)" class="sortable${k === S.sortKey ? " sorted" : ""}">${esc(label)}${k === S.sortKey ? (S.sortDir < 0 ? " ▼" : " ▲") : ""}</span>`).join("");
    $("#thead").querySelectorAll("span").forEach(s => { s.onclick = () => sortBy(s.dataset.k); });
    document.body.classList.toggle("withup", !!t.up);
    S.n = t.rate.length;
    refilter();
  }
  function value(k, i) { const t = S.tables[S.ck]; return k === "id" ? i : t[k][i]; }
  function sortBy(k) {
    S.sortDir = S.sortKey === k ? -S.sortDir : (k === "id" || k === "cls" ? 1 : -1);
    S.sortKey = k;
    setupTable();
  }
  function refilter() {
    const t = S.tables[S.ck], q = $("#q").value.trim().toLowerCase(), cls = $("#cls").value, dead = $("#dead").checked;
    const lim = {};
    document.querySelectorAll(".ranges input").forEach(i => {
      if (i.value === "") return;
      const k = i.dataset.min || i.dataset.max; (lim[k] = lim[k] || [-Infinity, Infinity])[i.dataset.min ? 0 : 1] = +i.value;
    });
    const g = group(S.ck), hc = g.head_classes;
    let idq = /^\d+$/.test(q) ? +q : null, match = null;
    if (q && idq === null) {
      const hit = n => n.toLowerCase().includes(q);
      const clsHit = new Set(g.classes.map((n, i) => hit(n) ? i : -1).filter(i => i >= 0));
      const upHit = hc ? new Set(hc.map((n, i) => hit(n) ? i : -1).filter(i => i >= 0)) : new Set();
      match = i => clsHit.has(t.cls[i]) || (t.up && upHit.has(t.up[i]));
    }
    const rows = [];
    for (let i = 0; i < S.n; i++) {
      if (idq !== null && i !== idq) continue;
      if (!dead && !(t.rate[i] > 0)) continue;
      if (cls !== "" && t.cls[i] !== +cls) continue;
      if (match && !match(i)) continue;
      let ok = true;
      for (const k in lim) { const v = t[k][i]; if (v === null || v < lim[k][0] || v > lim[k][1]) { ok = false; break; } }
      if (ok) rows.push(i);
    }
    const k = S.sortKey, d = S.sortDir;
    rows.sort((a, b) => {
      let va = value(k, a), vb = value(k, b);
      if (k === "cls" || k === "up") { va = va < 0 ? null : (k === "cls" ? className(S.ck, va) : headName(S.ck, va)); vb = vb < 0 ? null : (k === "cls" ? className(S.ck, vb) : headName(S.ck, vb)); }
      if (va === null || va === undefined) return (vb === null || vb === undefined) ? a - b : 1;
      if (vb === null || vb === undefined) return -1;
      return va < vb ? -d : va > vb ? d : a - b;
    });
    S.rows = rows;
    $("#count").textContent = `${rows.length} of ${S.n} latents`;
    $("#spacer").style.height = rows.length * ROW + "px";
    renderRows();
  }
  function renderRows() {
    const box = $("#rows"); if (!box || !S.tables[S.ck]) return;
    const t = S.tables[S.ck], first = Math.max(0, Math.floor(box.scrollTop / ROW) - 5);
    const last = Math.min(S.rows.length, first + Math.ceil(box.clientHeight / ROW) + 10);
    box.querySelectorAll(".row").forEach(r => r.remove());
    const cs = cols(), frag = document.createDocumentFragment();
    for (let r = first; r < last; r++) {
      const i = S.rows[r];
      const cells = cs.map(([k, , f]) => {
        if (k === "cls") return `<span class="name">${esc(className(S.ck, t.cls[i]))}</span>`;
        if (k === "up") return `<span class="name">${esc(headName(S.ck, t.up[i]))}</span>`;
        return `<span>${f(value(k, i))}</span>`;
      }).join("");
      const row = el("div", { class: "row" + (t.rate[i] > 0 ? "" : " dead") + (i === S.lat ? " sel" : ""), "data-l": i }, cells);
      row.style.top = r * ROW + "px";
      row.onclick = () => { location.hash = `c=${S.ck}&l=${i}`; };
      frag.appendChild(row);
    }
    box.appendChild(frag);
  }

  // --- a latent ------------------------------------------------------------------------------
  function showLatent(ck, lat, vs) {
    const box = $("#detail");
    if (!(lat >= 0 && lat < S.meta.checkpoints[ck].n_latents)) { box.innerHTML = `<p class="hint">No latent ${esc(lat)} in this checkpoint.</p>`; return; }
    document.querySelectorAll("#rows .row").forEach(r => r.classList.toggle("sel", +r.dataset.l === lat));
    withLatent(ck, lat, rec => {
      if (!vs) { box.innerHTML = ""; box.appendChild(latentView(ck, lat, rec, false)); performance.mark("vsae-latent-ready"); return; }
      withTable(vs[0], () => withLatent(vs[0], vs[1], rec2 => {
        box.innerHTML = `<div class="cmp-head"><a href="#c=${ck}&l=${lat}">× close comparison</a> · decoder cosine ${fmt(rec.m[vs[0]] && rec.m[vs[0]][0] === vs[1] ? rec.m[vs[0]][1] : null)}</div>`;
        const two = el("div", { class: "compare" });
        two.appendChild(latentView(ck, lat, rec, true));
        two.appendChild(latentView(vs[0], vs[1], rec2, true));
        box.appendChild(two);
      }));
    });
  }

  function latentView(ck, lat, rec, compact) {
    const t = S.tables[ck], c = S.meta.checkpoints[ck], g = group(ck), v = el("div", { class: "latent", "data-latent": lat });
    const dead = !(t.rate[lat] > 0);
    const stat = (k, val) => `<span class="chip"><b>${esc(k)}</b> ${val}</span>`;
    let h = `<h2>Latent ${lat} <small>${esc(c.name)}</small>${dead ? ' <span class="badge">dead on the held-out images</span>' : ""}</h2>
      <div class="chips">${stat("rate", fmtSci(t.rate[lat]))}${stat("images", fmtPct(t.img[lat]))}${stat("max", fmt(t.max[lat]))}${stat("mean", fmt(t.mean[lat]))}${stat("MS (e_n: " + (group(ck).ms_encoder || "?") + ")", fmt(t.ms[lat]))}${stat("purity", fmt(t.pur[lat]) + " top / " + fmt(t.pall[lat]) + " all")}${stat("top class", esc(className(ck, t.cls[lat])))}</div>`;
    h += `<div class="panels">`;
    h += `<div class="panel"><h3>Activation histogram</h3><canvas class="hist" width="320" height="140"></canvas><p class="note">${rec.hist.length ? "every held-out image it fires on, in ⅛-octave bins" : "no firing image"}</p></div>`;
    h += `<div class="panel"><h3>Classes of its firing images</h3>${classBars(ck, rec)}</div>`;
    if (rec.up) h += `<div class="panel"><h3>What it does to the classifier</h3>${effects(ck, rec)}</div>`;
    if (!compact) {
      h += `<div class="panel"><h3>Nearest latents (decoder cosine)</h3><ol class="nb">${rec.nb.map(([j, cs]) => `<li><a href="#c=${ck}&l=${j}">latent ${j}</a> <span class="num">${fmt(cs)}</span> <span class="name">${esc(className(ck, t.cls[j]))}</span></li>`).join("")}</ol></div>`;
      const ms = Object.keys(rec.m || {});
      if (ms.length) h += `<div class="panel"><h3>Same concept in other checkpoints</h3><ul class="nb">${ms.map(o => { const [j, cs, mu] = rec.m[o]; return `<li>${esc(S.meta.checkpoints[o].name)}: <a href="#c=${o}&l=${j}">latent ${j}</a> <span class="num">cos ${fmt(cs)}</span>${mu ? " mutual" : ""} · <a class="vs" href="#c=${ck}&l=${lat}&vs=${o}:${j}">side by side</a></li>`; }).join("")}</ul></div>`;
    }
    h += `</div>`;
    const gridNote = g.grid ? ` <label class="toggle"><input type="checkbox" class="heatbox"${S.heat ? " checked" : ""}> heatmap: its activation at each of the ${g.grid[1]}×${g.grid[2]} tokens (red = its maximum)</label>`
      : g.tokens > 1 ? ` <small>(no heatmap: its ${g.tokens} ${esc(g.token_kind)} tokens per image do not form a square grid)</small>` : "";
    h += `<h3>Top images${gridNote}</h3><div class="imgs top">${rec.top.map(im => figure(ck, im, rec)).join("") || '<p class="note">none</p>'}</div>`;
    if (rec.bands.length) {
      h += `<h3>Across its activation range <small>(a uniform sample of ${rec.nsample} of the images it fires on, by activation quantile)</small></h3>`;
      h += rec.bands.map(([q0, q1, lo, hi, ims]) => `<div class="band"><div class="blabel">${q0 === 0 ? `strongest ${Math.round(q1)}%` : `${Math.round(q0)}–${Math.round(q1)}% down`}<br><span class="num">${fmt(lo)} – ${fmt(hi)}</span></div><div class="imgs">${ims.map(im => figure(ck, im, rec)).join("")}</div></div>`).join("");
    }
    if (rec.abl && rec.abl.length && !compact) {
      h += `<h3>Removing the latent from its top images <small>(exact change of the predicted class's logit: x − a·d)</small></h3><table class="abl"><tr><th>image</th><th>label</th><th>prediction</th><th>logit</th><th>Δ logit</th><th>prediction without it</th></tr>`;
      h += rec.abl.map(([idx, lab, p, lg, dl, np]) => `<tr><td>${thumb(ck, idx, 40)}</td><td>${esc(className(ck, lab))}</td><td>${esc(headName(ck, p))}</td><td class="num">${fmt(lg)}</td><td class="num ${dl < 0 ? "neg" : "pos"}">${dl > 0 ? "+" : ""}${fmt(dl)}</td><td class="${np !== p ? "changed" : ""}">${esc(headName(ck, np))}</td></tr>`).join("") + `</table>`;
    }
    v.innerHTML = h;
    drawHist(v.querySelector("canvas.hist"), rec.hist);
    v.querySelectorAll(".heatbox").forEach(b => { b.onchange = () => { S.heat = b.checked; document.body.classList.toggle("noheat", !S.heat); document.querySelectorAll(".heatbox").forEach(o => { o.checked = S.heat; }); }; });
    if (g.grid) v.querySelectorAll("canvas.heat").forEach(cv => drawHeat(cv, rec.heat && rec.heat[cv.dataset.idx], g.grid));
    document.body.classList.toggle("noheat", !S.heat);
    return v;
  }

  function thumb(ck, idx, size) {
    const g = group(ck), src = `thumbs/g${S.meta.checkpoints[ck].group}-${idx}.png`;
    if (g.thumbs) return `<div class="noimg" style="width:${size}px;height:${size}px" title="${esc(g.thumbs)}">#${idx}</div>`;
    // small images (Fashion-MNIST) are enlarged with crisp pixels; photo thumbnails are smoothed
    return `<img src="${src}" width="${size}" height="${size}" alt="image ${idx}" onload="if (this.naturalWidth >= 64) this.style.imageRendering = 'auto'" onerror="this.replaceWith(Object.assign(document.createElement('div'),{className:'noimg',textContent:'#${idx}'}))">`;
  }
  function figure(ck, im, rec) {
    const [idx, val, lab] = im, g = group(ck);
    const heat = g.grid && rec.heat && rec.heat[idx] ? `<canvas class="heat" data-idx="${idx}" width="96" height="96"></canvas>` : "";
    return `<figure class="thumb"><div class="wrap">${thumb(ck, idx, 96)}${heat}</div><figcaption><span class="num">${fmt(val)}</span> ${esc(lab >= 0 ? className(ck, lab) : "")}</figcaption></figure>`;
  }
  function classBars(ck, rec) {
    if (!rec.cls.length) return `<p class="note">no labelled firing image</p>`;
    const tot = rec.ncls;
    return `<div class="bars">` + rec.cls.map(([c, n]) => `<div class="bar"><span class="name">${esc(className(ck, c))}</span><span class="track"><span style="width:${(100 * n / tot).toFixed(1)}%"></span></span><span class="num">${(100 * n / tot).toFixed(0)}% <small>(${n})</small></span></div>`).join("") + `</div><p class="note">${tot} labelled images it fires on</p>`;
  }
  function effects(ck, rec) {
    const li = (arr, cls) => arr.map(([c, w]) => `<li><span class="name">${esc(headName(ck, c))}</span> <span class="num ${cls}">${w > 0 ? "+" : ""}${fmt(w)}</span></li>`).join("");
    return `<div class="fx"><div><b>promotes</b><ol>${li(rec.up, "pos")}</ol></div><div><b>suppresses</b><ol>${li(rec.down, "neg")}</ol></div></div><p class="note">logit change per unit of activation: the head applied to the decoder direction${group(ck).weights === "random-init" ? " (a random-init backbone: its head is untrained)" : ""}</p>`;
  }

  function drawHist(cv, hist) {
    if (!cv) return;
    const ctx = cv.getContext("2d"), W = cv.width, H = cv.height, L = 8, R = 8, T = 16, B = 30;
    ctx.clearRect(0, 0, W, H);
    if (!hist.length) return;
    const b0 = hist[0], counts = hist.slice(1), n = counts.length, top = Math.max(...counts);
    const bw = (W - L - R) / n, hp = S.meta.hist, total = counts.reduce((a, c) => a + c, 0);
    const edge = b => Math.pow(2, hp.low_octave + b / hp.per_octave);
    ctx.fillStyle = "#4a78c2";
    counts.forEach((c, i) => { const h = (H - T - B) * Math.sqrt(c / top); ctx.fillRect(L + i * bw + 0.5, H - B - h, Math.max(1, bw - 1), h); });
    ctx.strokeStyle = "#999"; ctx.beginPath(); ctx.moveTo(L, H - B + 0.5); ctx.lineTo(W - R, H - B + 0.5); ctx.stroke();
    ctx.fillStyle = "#444"; ctx.font = "10px sans-serif";
    const ticks = Math.min(n, 4);
    for (let k = 0; k <= ticks; k++) {  // edges are log-spaced: label a few of them
      const b = Math.round(k * n / ticks), x = L + b * bw;
      ctx.textAlign = k === 0 ? "left" : k === ticks ? "right" : "center";
      ctx.fillText(fmt(edge(b0 + b)), x, H - B + 12);
      ctx.beginPath(); ctx.moveTo(x + 0.5, H - B); ctx.lineTo(x + 0.5, H - B + 3); ctx.stroke();
    }
    ctx.textAlign = "center"; ctx.fillText("activation on an image (log axis)", W / 2, H - 4);
    ctx.textAlign = "left"; ctx.fillText(`${total} images · tallest bar ${top} (√ height)`, L, 10);
  }
  function drawHeat(cv, b64, grid) {
    if (!b64) return;
    const [, rows, colsN] = grid, raw = atob(b64);
    const small = document.createElement("canvas"); small.width = colsN; small.height = rows;
    const sctx = small.getContext("2d"), img = sctx.createImageData(colsN, rows);
    for (let i = 0; i < rows * colsN; i++) {  // silent: transparent; weak: yellow; strongest: red
      const v = raw.charCodeAt(i) / 255;
      img.data[4 * i] = 255; img.data[4 * i + 1] = Math.round(230 * (1 - v)); img.data[4 * i + 2] = Math.round(40 * (1 - v));
      img.data[4 * i + 3] = Math.round(180 * Math.min(1, 1.6 * v));
    }
    sctx.putImageData(img, 0, 0);
    const ctx = cv.getContext("2d");
    ctx.imageSmoothingEnabled = false;  // one block per token: the patch boundaries are the model's
    ctx.clearRect(0, 0, cv.width, cv.height);
    ctx.drawImage(small, 0, 0, cv.width, cv.height);
  }
})();
