"use strict";
// cfp_onnx report. Draws every tube in the page from the kernels' feature maps (SPEC §6:
// trilinear upsampling with half-pixel centres, min-max over the tube, OpenCV's JET,
// 50/50 blend), the pyramid graph, and a sortable table of every kernel.
// Model-supplied strings are only ever set with textContent or setAttribute.
(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var PAGE = 50;
  var data = JSON.parse(document.getElementById("cfp-data").textContent);
  var views = data.views;
  var jet = data.jet;
  var length = 1;
  views.forEach(function (v) { length = Math.max(length, v.size[0]); });
  var frame = 0;
  var playing = true;
  var state = views.map(function () {
    return { node: null, tube: null, profile: null, sortKey: "relevance", desc: true, page: 0, rows: [] };
  });
  var scrub = document.getElementById("scrub");
  var frameNo = document.getElementById("frame-no");
  var playButton = document.getElementById("play");

  function $(id) { return document.getElementById(id); }

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

  function el(tag, text, parent) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = text; }
    if (parent) { parent.appendChild(e); }
    return e;
  }

  // ------------------------------------------------------------------ maps and tubes

  function decode(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) { out[i] = s.charCodeAt(i); }
    return out;
  }

  views.forEach(function (v) {
    if (v.maps) { v.maps.bytes = v.maps.data.map(decode); }
  });

  // 1-D linear interpolation weights, as tubes.linear_matrix (align_corners=False).
  function linear(nIn, nOut) {
    var lo = new Int32Array(nOut), hi = new Int32Array(nOut), f = new Float64Array(nOut);
    for (var i = 0; i < nOut; i++) {
      var src = Math.max((i + 0.5) * (nIn / nOut) - 0.5, 0);
      var l = Math.min(Math.floor(src), nIn - 1);
      lo[i] = l; hi[i] = Math.min(l + 1, nIn - 1); f[i] = src - l;
    }
    return { lo: lo, hi: hi, f: f };
  }

  function rawMap(v, node) {
    var g = v.maps.group[node], s = v.maps.slot[node], shape = v.maps.shapes[g];
    var n = shape[0] * shape[1] * shape[2];
    return { shape: shape, values: v.maps.bytes[g].subarray(s * n, (s + 1) * n) };
  }

  // The normalised tube [T*H*W] in [0, 1]: upsample W, then H, then T; min-max.
  function tube(v, node) {
    var m = rawMap(v, node), t = m.shape[0], h = m.shape[1], w = m.shape[2];
    var T = v.size[0], H = v.size[1], W = v.size[2];
    var lw = linear(w, W), lh = linear(h, H), lt = linear(t, T);
    var a = new Float64Array(t * h * W);
    for (var r = 0; r < t * h; r++) {
      for (var x = 0; x < W; x++) {
        a[r * W + x] = m.values[r * w + lw.lo[x]] * (1 - lw.f[x]) + m.values[r * w + lw.hi[x]] * lw.f[x];
      }
    }
    var b = new Float64Array(t * H * W);
    for (var z = 0; z < t; z++) {
      for (var y = 0; y < H; y++) {
        var o = (z * H + y) * W, p0 = (z * h + lh.lo[y]) * W, p1 = (z * h + lh.hi[y]) * W, fy = lh.f[y];
        for (x = 0; x < W; x++) { b[o + x] = a[p0 + x] * (1 - fy) + a[p1 + x] * fy; }
      }
    }
    var plane = H * W, out = new Float64Array(T * plane), mn = Infinity, mx = -Infinity;
    for (var k = 0; k < T; k++) {
      var q0 = lt.lo[k] * plane, q1 = lt.hi[k] * plane, fk = lt.f[k];
      for (var j = 0; j < plane; j++) {
        var val = b[q0 + j] * (1 - fk) + b[q1 + j] * fk;
        out[k * plane + j] = val;
        if (val < mn) { mn = val; }
        if (val > mx) { mx = val; }
      }
    }
    var span = mx - mn;
    for (j = 0; j < out.length; j++) { out[j] = span > 0 ? (out[j] - mn) / span : 0; }
    return out;
  }

  function rint(x) {  // round half to even, as NumPy's rint
    var r = Math.round(x);
    return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
  }

  // Blend frame k of a normalised tube onto the frame's pixels: RGBA bytes.
  function blend(v, norm, k) {
    var plane = v.size[1] * v.size[2], px = v.pixels[k], out = new Uint8ClampedArray(plane * 4);
    for (var j = 0; j < plane; j++) {
      var g = rint(norm[k * plane + j] * 255) * 3;
      for (var c = 0; c < 3; c++) { out[j * 4 + c] = rint(0.5 * px[j * 4 + c] + 0.5 * jet[g + c]); }
      out[j * 4 + 3] = 255;
    }
    return out;
  }

  function loadPixels(v) {
    return Promise.all(v.frames.map(function (src) {
      return new Promise(function (resolve) {
        var img = new Image();
        img.onload = function () {
          var c = document.createElement("canvas");
          c.width = v.size[2]; c.height = v.size[1];
          var ctx = c.getContext("2d");
          ctx.drawImage(img, 0, 0, c.width, c.height);
          resolve(ctx.getImageData(0, 0, c.width, c.height).data);
        };
        img.src = src;
      });
    })).then(function (px) { v.pixels = px; });
  }

  // ------------------------------------------------------------------ playback

  function pickIndex(n) { return Math.min(n - 1, Math.floor(frame * n / length)); }

  function drawCanvas(id, rgba, v) {
    var c = $(id);
    if (!c || !rgba) { return; }
    var ctx = c.getContext("2d");
    ctx.putImageData(new ImageData(rgba, v.size[2], v.size[1]), 0, 0);
  }

  function show() {
    views.forEach(function (v, i) {
      if (!v.pixels) { return; }
      var k = pickIndex(v.size[0]);
      drawCanvas("clip-" + i, new Uint8ClampedArray(v.pixels[k]), v);
      var st = state[i];
      if (st.tube) { drawCanvas("tube-" + i, st.frames[k], v); }
      if (v.classTube) { $("class-" + i).setAttribute("src", v.classTube.frames[Math.min(v.classTube.frames.length - 1, k)]); }
      var now = $("now-" + i);
      if (now && st.profile) {
        var x = 300 * k / Math.max(st.profile.length - 1, 1);
        now.setAttribute("x1", x); now.setAttribute("x2", x);
      }
    });
    scrub.value = String(frame);
    frameNo.textContent = "frame " + (frame + 1) + " / " + length;
  }

  function drawProfile(i, profile) {
    var svg = $("profile-" + i);
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var n = profile.length;
    var pts = profile.map(function (p, t) {
      return (300 * t / Math.max(n - 1, 1)).toFixed(1) + "," + (56 - 52 * p).toFixed(1);
    });
    svgEl("polyline", { points: pts.join(" ") }, svg);
    svgEl("line", { id: "now-" + i, "class": "now", x1: 0, x2: 0, y1: 0, y2: 60 }, svg);
  }

  function shuffleLabel(v, n) {
    var r = v.nodes.shuffle ? v.nodes.shuffle[n] : undefined;
    if (r === undefined) { return "untested"; }
    if (r === null) { return "inactive"; }
    return r <= data.motionDrop ? "motion" : "appearance";
  }

  function name(v, n) { return v.layers[v.nodes.layer[n]]; }

  function select(i, node, follow) {
    var v = views[i], st = state[i];
    if (node === null || node === undefined || node < 0) { return; }
    st.node = node;
    if (v.maps && v.pixels) {
      var norm = tube(v, node);
      st.tube = norm;
      st.frames = [];
      var T = v.size[0], plane = v.size[1] * v.size[2];
      st.profile = [];
      for (var k = 0; k < T; k++) {
        st.frames.push(blend(v, norm, k));
        var s = 0;
        for (var j = 0; j < plane; j++) { s += norm[k * plane + j]; }
        st.profile.push(s / plane);
      }
      $("tube-" + i).setAttribute("data-node", String(node));
      var cap = $("tube-caption-" + i);
      cap.textContent = "tube of " + short(name(v, node)) + " : " + v.nodes.channel[node];
      cap.setAttribute("title", name(v, node));
      drawProfile(i, st.profile);
    }
    var ratio = v.nodes.shuffle ? v.nodes.shuffle[node] : null;
    var info = $("info-text-" + i);
    info.textContent = "layer " + short(name(v, node)) + "\nchannel " + v.nodes.channel[node] +
      ", depth " + v.nodes.depth[node] + ", relevance " + v.nodes.relevance[node].toFixed(3) +
      "\nshuffle test: " + shuffleLabel(v, node) +
      (ratio === null || ratio === undefined ? "" : " (response x" + ratio.toFixed(2) + " with frames shuffled)");
    $("profile-label-" + i).hidden = !st.profile;
    info.setAttribute("title", name(v, node));
    document.querySelectorAll("#graph-" + i + " circle").forEach(function (c) {
      c.classList.toggle("sel", c.getAttribute("data-node") === String(node));
    });
    document.querySelectorAll("#table-" + i + " tbody tr").forEach(function (r) {
      r.classList.toggle("sel", r.getAttribute("data-node") === String(node));
    });
    if (follow && v.counterpart && views.length > 1) {
      var other = 1 - i, twin = v.counterpart[node];
      if (twin >= 0) { select(other, twin, false); } else {
        $("info-text-" + other).textContent = "no counterpart of " + short(name(v, node)) + " : " +
          v.nodes.channel[node] + " in this pyramid";
      }
    }
    show();
  }

  // ------------------------------------------------------------------ the graph

  function relColour(r, lo, hi) {  // light yellow (lowest shown) -> dark red (highest)
    var a = [254, 224, 139], b = [165, 0, 38], f = hi > lo ? (r - lo) / (hi - lo) : 1;
    var c = a.map(function (x, k) { return Math.round(x + (b[k] - x) * Math.max(0, Math.min(1, f))); });
    return "rgb(" + c.join(",") + ")";
  }

  var ROW = 90, TOP = 60;

  function layout(v, width) {
    var rows = [];
    v.shown.forEach(function (n) {
      var d = v.nodes.depth[n];
      while (rows.length <= d) { rows.push([]); }
      rows[d].push(n);
    });
    var pos = {}, margin = 24;
    rows.forEach(function (row, d) {
      row.sort(function (a, b) { return v.nodes.relevance[b] - v.nodes.relevance[a] || a - b; });
      var frac = rows.length > 1 ? 0.35 + 0.65 * d / (rows.length - 1) : 1;  // wider as it goes down
      var step = Math.min(26, frac * (width - 2 * margin) / Math.max(row.length, 1));
      row.forEach(function (n, r) {  // strongest in the middle, then alternating outwards
        var off = r === 0 ? 0 : (r % 2 ? 1 : -1) * Math.ceil(r / 2);
        pos[n] = { x: width / 2 + off * step, y: TOP + (d + 1) * ROW, step: step };
      });
    });
    return { rows: rows, pos: pos, apex: { x: width / 2, y: TOP }, height: TOP + rows.length * ROW + 30 };
  }

  function drawGraph(v, i) {
    var svg = $("graph-" + i), tip = $("tip-" + i);
    if (!svg || !v.shown.length) { return; }
    var width = Math.max(320, svg.parentNode.clientWidth - 4);
    var g = layout(v, width);
    svg.setAttribute("width", width);
    svg.setAttribute("height", g.height);
    var rels = v.shown.map(function (n) { return v.nodes.relevance[n]; });
    var lo = Math.min.apply(null, rels), hi = Math.max.apply(null, rels);
    $("legend-lo-" + i).textContent = lo.toFixed(3);
    $("legend-hi-" + i).textContent = hi.toFixed(3);
    g.rows.forEach(function (row, d) {
      var t = svgEl("text", { x: 4, y: TOP + (d + 1) * ROW - 14 }, svg);
      t.textContent = "depth " + d + (d === 0 ? " (last conv layers)" : "") + ": " + row.length + " shown";
    });
    var linkLayer = svgEl("g", { "class": "links" }, svg);
    (g.rows[0] || []).forEach(function (n) {  // the class at the apex, reading its depth-0 kernels
      var b = g.pos[n];
      svgEl("line", { x1: g.apex.x, y1: g.apex.y, x2: b.x, y2: b.y, "class": "head",
        "stroke-opacity": (0.05 + 0.3 * v.nodes.relevance[n]).toFixed(2) }, linkLayer);
    });
    svgEl("rect", { x: g.apex.x - 9, y: g.apex.y - 9, width: 18, height: 18, "class": "apex" }, svg);
    var apexText = svgEl("text", { x: g.apex.x + 14, y: g.apex.y + 4, "class": "apex" }, svg);
    apexText.textContent = v.classLabel;
    var parents = {};
    v.links.forEach(function (l, k) {
      (parents[l[1]] = parents[l[1]] || []).push(k);
    });
    var lines = v.links.map(function (l) {
      var a = g.pos[l[0]], b = g.pos[l[1]];
      return svgEl("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y,
        "stroke-opacity": (0.08 + 0.6 * l[2]).toFixed(2), "data-source": l[0], "data-target": l[1] }, linkLayer);
    });
    var slider = $("links-" + i), count = $("links-n-" + i);
    slider.max = String(v.links.length);
    slider.value = String(Math.min(v.links.length, 150));
    function limit() {
      var n = Number(slider.value);
      lines.forEach(function (line, k) { line.style.display = k < n ? "" : "none"; });
      count.textContent = n + " of " + v.links.length + " strongest";
    }
    slider.addEventListener("input", limit);
    limit();
    function paths(n) {  // links and nodes on every path from n up to the head
      var seen = {}, hot = {}, todo = [n];
      seen[n] = true;
      while (todo.length) {
        var m = todo.pop();
        (parents[m] || []).forEach(function (k) {
          hot[k] = true;
          var s = v.links[k][0];
          if (!seen[s]) { seen[s] = true; todo.push(s); }
        });
      }
      return { nodes: seen, links: hot };
    }
    v.shown.forEach(function (n) {
      var p = g.pos[n], r = v.nodes.relevance[n];
      var f = hi > lo ? (r - lo) / (hi - lo) : 1;
      var c = svgEl("circle", { cx: p.x, cy: p.y, r: Math.min(3 + 6 * f, Math.max(2, 0.48 * p.step)).toFixed(1),
        fill: relColour(r, lo, hi), "data-node": n, id: "node-" + i + "-" + n }, svg);
      c.addEventListener("mouseenter", function () {
        var on = paths(n);
        svg.classList.add("focus");
        lines.forEach(function (line, k) { line.classList.toggle("hot", !!on.links[k]); });
        svg.querySelectorAll("circle").forEach(function (x) {
          x.classList.toggle("on", !!on.nodes[x.getAttribute("data-node")]);
        });
        tip.textContent = "layer: " + short(name(v, n)) + "\nchannel: " + v.nodes.channel[n] +
          "\ndepth: " + v.nodes.depth[n] + "\nrelevance: " + r.toFixed(4) + "\nshuffle: " + shuffleLabel(v, n);
        tip.style.left = Math.min(p.x + 12, width - 260) + "px";
        tip.style.top = (p.y + 8) + "px";
        tip.hidden = false;
      });
      c.addEventListener("mouseleave", function () {
        svg.classList.remove("focus");
        tip.hidden = true;
      });
      c.addEventListener("click", function () { select(i, n, true); });
    });
  }

  // ------------------------------------------------------------------ the kernel table

  function sortValue(v, key, n) {
    if (key === "layer") { return name(v, n); }
    if (key === "shuffle") { var r = v.nodes.shuffle ? v.nodes.shuffle[n] : null; return r === null || r === undefined ? Infinity : r; }
    return v.nodes[key][n];
  }

  function thumbnail(v, n) {
    var c = document.createElement("canvas");
    c.className = "thumb";
    if (!v.maps) { return c; }
    var m = rawMap(v, n), t = m.shape[0], hw = m.shape[1] * m.shape[2];
    c.width = m.shape[2]; c.height = m.shape[1];
    var img = new ImageData(c.width, c.height), mean = new Float64Array(hw), mn = Infinity, mx = -Infinity;
    for (var j = 0; j < hw; j++) {
      for (var k = 0; k < t; k++) { mean[j] += m.values[k * hw + j] / t; }
      mn = Math.min(mn, mean[j]); mx = Math.max(mx, mean[j]);
    }
    for (j = 0; j < hw; j++) {
      var g = Math.round(mx > mn ? (mean[j] - mn) / (mx - mn) * 255 : 0) * 3;
      img.data[j * 4] = jet[g]; img.data[j * 4 + 1] = jet[g + 1]; img.data[j * 4 + 2] = jet[g + 2]; img.data[j * 4 + 3] = 255;
    }
    c.getContext("2d").putImageData(img, 0, 0);
    c.title = "time-averaged map";
    return c;
  }

  function filtered(v, i) {
    var d = $("depth-" + i).value, q = $("find-" + i).value.trim().toLowerCase(), st = state[i];
    var out = [];
    for (var n = 0; n < v.nodes.layer.length; n++) {
      if (d !== "" && v.nodes.depth[n] !== Number(d)) { continue; }
      if (q && (name(v, n) + ":" + v.nodes.channel[n]).toLowerCase().indexOf(q) < 0) { continue; }
      out.push(n);
    }
    out.sort(function (a, b) {
      var x = sortValue(v, st.sortKey, a), y = sortValue(v, st.sortKey, b);
      var c = x < y ? -1 : x > y ? 1 : a - b;
      return st.desc ? -c : c;
    });
    return out;
  }

  function drawTable(v, i) {
    var table = $("table-" + i);
    if (!table) { return; }
    var st = state[i], rows = filtered(v, i), body = table.querySelector("tbody");
    st.rows = rows;
    var pages = Math.max(1, Math.ceil(rows.length / PAGE));
    st.page = Math.min(st.page, pages - 1);
    while (body.firstChild) { body.removeChild(body.firstChild); }
    rows.slice(st.page * PAGE, (st.page + 1) * PAGE).forEach(function (n) {
      var tr = el("tr", null, body);
      tr.className = "kernel" + (n === st.node ? " sel" : "");
      tr.setAttribute("data-node", String(n));
      tr.setAttribute("data-view", String(i));
      el("td", v.nodes.relevance[n].toFixed(3), tr);
      el("td", String(v.nodes.depth[n]), tr);
      var td = el("td", short(name(v, n)), tr);
      td.className = "name";
      td.setAttribute("title", name(v, n));
      el("td", String(v.nodes.channel[n]), tr);
      var label = shuffleLabel(v, n), r = v.nodes.shuffle ? v.nodes.shuffle[n] : null;
      var sh = el("td", label + (r === null || r === undefined ? "" : " (" + r.toFixed(2) + ")"), tr);
      sh.className = label;
      el("td", null, tr).appendChild(thumbnail(v, n));
      tr.addEventListener("click", function () { select(i, n, true); });
    });
    $("count-" + i).textContent = rows.length + " kernels";
    $("page-" + i).textContent = " page " + (st.page + 1) + " / " + pages + " ";
    table.querySelectorAll("th[data-key]").forEach(function (th) {
      var on = th.getAttribute("data-key") === st.sortKey;
      th.classList.toggle("sorted", on);
      th.classList.toggle("desc", on && st.desc);
    });
  }

  function wireTable(v, i) {
    var table = $("table-" + i);
    if (!table) { return; }
    var st = state[i];
    table.querySelectorAll("th[data-key]").forEach(function (th) {
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        st.desc = key === st.sortKey ? !st.desc : key === "relevance";
        st.sortKey = key;
        st.page = 0;
        drawTable(v, i);
      });
    });
    ["depth-", "find-"].forEach(function (p) {
      $(p + i).addEventListener("input", function () { st.page = 0; drawTable(v, i); });
    });
    $("prev-" + i).addEventListener("click", function () { st.page = Math.max(0, st.page - 1); drawTable(v, i); });
    $("next-" + i).addEventListener("click", function () { st.page += 1; drawTable(v, i); });
    drawTable(v, i);
  }

  // ------------------------------------------------------------------ start

  function pageTo(i, node) {  // the table page that lists `node` (for tests and links)
    var st = state[i], at = st.rows.indexOf(node);
    if (at < 0) { $("depth-" + i).value = ""; $("find-" + i).value = ""; st.page = 0; drawTable(views[i], i); at = st.rows.indexOf(node); }
    st.page = Math.floor(at / PAGE);
    drawTable(views[i], i);
    return at >= 0;
  }

  views.forEach(function (v, i) {
    var canvases = ["clip-" + i, "tube-" + i];
    canvases.forEach(function (id) {
      var c = $(id);
      if (c) { c.width = v.size[2]; c.height = v.size[1]; }
    });
    if (v.classTube) {
      $("class-fig-" + i).hidden = false;
      $("class-caption-" + i).textContent = v.classTube.caption;
      $("class-min-" + i).textContent = "-" + v.classTube.scale.toPrecision(3);
      $("class-max-" + i).textContent = "+" + v.classTube.scale.toPrecision(3);
    }
    drawGraph(v, i);
    wireTable(v, i);
  });

  window.cfpReport = { ready: false, tube: function (i, n) { return Array.from(tube(views[i], n)); },
    pixels: function (i, n, k) { return Array.from(blend(views[i], tube(views[i], n), k)); },
    select: function (i, n) { select(i, n, true); }, pageTo: pageTo, state: state };

  Promise.all(views.map(loadPixels)).then(function () {
    views.forEach(function (v, i) {
      var best = null;
      v.shown.forEach(function (n) {
        if (v.nodes.depth[n] === 0 && (best === null || v.nodes.relevance[n] > v.nodes.relevance[best])) { best = n; }
      });
      if (best !== null) { select(i, best, false); }
    });
    window.cfpReport.ready = true;
    show();
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
}());
