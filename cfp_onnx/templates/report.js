"use strict";
// cfp_onnx report: plays the clip and the selected kernel's tube in sync, draws the
// pyramid graph. Model-supplied strings are only ever set with textContent.
(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("cfp-data").textContent);
  var views = data.views;
  var length = 1;
  views.forEach(function (v) { length = Math.max(length, v.frames.length); });
  var frame = 0;
  var playing = true;
  var selected = views.map(function () { return null; });
  var byNode = views.map(function (v) {
    var m = {};
    v.kernels.forEach(function (k) { m[k.node] = k; });
    return m;
  });
  var scrub = document.getElementById("scrub");
  var frameNo = document.getElementById("frame-no");
  var playButton = document.getElementById("play");

  function short(s) {
    var n = data.maxName;
    if (s.length <= n) { return s; }
    var head = Math.floor((n - 1) * 2 / 3);
    return s.slice(0, head) + "\u2026" + s.slice(s.length - (n - 1 - head));
  }

  function svgEl(tag, attrs, parent) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(e); }
    return e;
  }

  function pick(list, f) {
    if (!list.length) { return ""; }
    return list[Math.min(list.length - 1, Math.floor(f * list.length / length))];
  }

  function setSrc(id, src) {
    var img = document.getElementById(id);
    if (img && src && img.getAttribute("src") !== src) { img.setAttribute("src", src); }
  }

  function show() {
    views.forEach(function (v, i) {
      setSrc("clip-" + i, pick(v.frames, frame));
      if (selected[i]) { setSrc("tube-" + i, pick(selected[i].frames, frame)); }
      setSrc("class-" + i, pick(v.classTube, frame));
      var now = document.getElementById("now-" + i);
      if (now && selected[i]) {
        var n = selected[i].profile.length;
        var x = 300 * (Math.floor(frame * n / length)) / Math.max(n - 1, 1);
        now.setAttribute("x1", x);
        now.setAttribute("x2", x);
      }
    });
    scrub.value = String(frame);
    frameNo.textContent = "frame " + (frame + 1) + " / " + length;
  }

  function drawProfile(i, k) {
    var svg = document.getElementById("profile-" + i);
    if (!svg) { return; }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var n = k.profile.length;
    var pts = k.profile.map(function (p, t) {
      var x = 300 * t / Math.max(n - 1, 1);
      var y = 76 - 72 * Math.max(0, Math.min(1, p));
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    svgEl("polyline", { points: pts.join(" ") }, svg);
    svgEl("line", { id: "now-" + i, "class": "now", x1: 0, x2: 0, y1: 0, y2: 80 }, svg);
  }

  function select(i, node) {
    var k = byNode[i][node];
    if (!k) { return; }
    selected[i] = k;
    var img = document.getElementById("tube-" + i);
    img.setAttribute("data-node", String(k.node));
    var cap = document.getElementById("tube-caption-" + i);
    cap.textContent = "tube of " + short(k.layer) + " : " + k.channel;
    cap.setAttribute("title", k.layer);
    var info = document.getElementById("info-text-" + i);
    info.textContent = "layer " + short(k.layer) + "\nchannel " + k.channel + ", depth " + k.depth +
      ", relevance " + k.relevance.toFixed(3) + "\nshuffle test: " + k.motion +
      (k.ratio === null ? "" : " (response x" + k.ratio.toFixed(2) + " with frames shuffled)") +
      "\ntemporal profile (tube mean per frame):";
    info.setAttribute("title", k.layer);
    document.querySelectorAll("#graph-" + i + " circle").forEach(function (c) {
      c.classList.toggle("sel", c.getAttribute("data-node") === String(node));
    });
    document.querySelectorAll("#graph-" + i + " line").forEach(function (l) {
      var hot = l.getAttribute("data-source") === String(node) || l.getAttribute("data-target") === String(node);
      l.classList.toggle("hot", hot);
    });
    document.querySelectorAll("tr.kernel[data-view='" + i + "']").forEach(function (r) {
      r.classList.toggle("sel", r.getAttribute("data-node") === String(node));
    });
    drawProfile(i, k);
    show();
  }

  function layout(v) {
    var cols = [];
    v.kernels.forEach(function (k) {
      while (cols.length <= k.depth) { cols.push([]); }
      cols[k.depth].push(k);
    });
    var rows = 1;
    cols.forEach(function (c) { rows = Math.max(rows, c.length); });
    var pos = {};
    var rowH = rows <= 20 ? 24 : 14, colW = 180, top = 28, left = 24;
    cols.forEach(function (c, d) {
      var offset = (rows - c.length) * rowH / 2;
      c.forEach(function (k, r) { pos[k.node] = { x: left + d * colW, y: top + offset + r * rowH }; });
    });
    return { cols: cols, pos: pos, width: left * 2 + Math.max(0, cols.length - 1) * colW + 20, height: top + rows * rowH + 10 };
  }

  function tipText(k) {
    return "layer: " + short(k.layer) + "\nchannel: " + k.channel + "\ndepth: " + k.depth +
      "\nrelevance: " + k.relevance.toFixed(4) + "\nshuffle: " + k.motion;
  }

  function drawGraph(v, i) {
    var svg = document.getElementById("graph-" + i);
    var tip = document.getElementById("tip-" + i);
    if (!svg || !v.kernels.length) { return; }
    var g = layout(v);
    svg.setAttribute("width", g.width);
    svg.setAttribute("height", g.height);
    g.cols.forEach(function (c, d) {
      var t = svgEl("text", { x: 24 + d * 180 - 10, y: 14 }, svg);
      t.textContent = "depth " + d;
    });
    v.links.forEach(function (l) {
      var a = g.pos[l[0]], b = g.pos[l[1]];
      if (!a || !b) { return; }
      svgEl("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, "stroke-opacity": (0.1 + 0.5 * l[2]).toFixed(2),
        "data-source": l[0], "data-target": l[1] }, svg);
    });
    v.kernels.forEach(function (k) {
      var p = g.pos[k.node];
      var c = svgEl("circle", { cx: p.x, cy: p.y, r: (3 + 3 * Math.max(0, k.relevance)).toFixed(1),
        "class": k.motion, "data-node": k.node, id: "node-" + i + "-" + k.node }, svg);
      c.addEventListener("mouseenter", function () {
        tip.textContent = tipText(k);
        tip.style.left = (p.x + 12) + "px";
        tip.style.top = (p.y + 6) + "px";
        tip.hidden = false;
      });
      c.addEventListener("mouseleave", function () { tip.hidden = true; });
      c.addEventListener("click", function () { select(i, k.node); });
    });
  }

  views.forEach(function (v, i) {
    drawGraph(v, i);
    var best = null;
    v.kernels.forEach(function (k) {
      if (k.depth === 0 && (best === null || k.relevance > best.relevance)) { best = k; }
    });
    if (best) { select(i, best.node); }
  });
  document.querySelectorAll("tr.kernel").forEach(function (r) {
    r.addEventListener("click", function () {
      select(Number(r.getAttribute("data-view")), Number(r.getAttribute("data-node")));
    });
  });
  scrub.max = String(length - 1);
  scrub.addEventListener("input", function () {
    playing = false;
    playButton.textContent = "Play";
    frame = Number(scrub.value);
    show();
  });
  playButton.addEventListener("click", function () {
    playing = !playing;
    playButton.textContent = playing ? "Pause" : "Play";
  });
  setInterval(function () {
    if (playing) { frame = (frame + 1) % length; show(); }
  }, 1000 / (data.fps || 8));
  show();
}());
