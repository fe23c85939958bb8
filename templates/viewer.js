{#- VIEWER/VIEWER.JS, rendered once per medium (for the wording). Not autoescaped: every value
    goes through |tojson, which also escapes < > & ' so nothing can close a script. -#}
/* VIEWER/VIEWER.JS - an interactive stack viewer for the IHE PDI pages on this medium.
   Progressive enhancement: the pages under IHE_PDI are complete without it (a page per image,
   links for every window preset). Plain JavaScript, no libraries, nothing loaded from outside
   the medium, nothing started automatically. If anything here fails the plain page stays. */
(function () {
  "use strict";
  var T = {{ {"image_of": t.image_of, "previous": t.previous, "next": t.next,
              "help": t.viewer_help, "slider": t.viewer_slider, "window": t.window} | tojson }};
  var script = document.currentScript;
  var base = script && script.src ? script.src.replace(/[^\/]*$/, "") : "";
  var STEP = { ArrowRight: 1, ArrowDown: 1, PageDown: 1, j: 1, n: 1,
               ArrowLeft: -1, ArrowUp: -1, PageUp: -1, k: -1, p: -1 };

  function fmt(text, values) {
    return text.replace(/\{(\w+)\}/g, function (m, key) {
      return Object.prototype.hasOwnProperty.call(values, key) ? String(values[key]) : m;
    });
  }

  function make(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text) { node.appendChild(document.createTextNode(text)); }
    return node;
  }

  function leaf(href) {
    return (href || "").replace(/[?#].*$/, "").replace(/^.*\//, "");
  }

  function textOf(id) {
    var node = document.getElementById(id);
    return node ? node.textContent : "";
  }

  function typing(target) {
    var tag = target && target.tagName;
    return tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable) ||
      (tag === "INPUT" && target.type !== "range");
  }

  function modified(e) {
    return e.altKey || e.ctrlKey || e.metaKey;
  }

  function addStyle() {
    if (!base) { return; }
    var link = document.createElement("link");
    link.rel = "stylesheet";
    link.type = "text/css";
    link.href = base + "VIEWER.CSS";
    document.getElementsByTagName("head")[0].appendChild(link);
  }

  /* Image pages: the arrow keys follow the rel="prev" / rel="next" links. */
  function pageKeys() {
    document.addEventListener("keydown", function (e) {
      if (modified(e) || typing(e.target)) { return; }
      var step = STEP[e.key];
      var rel = step > 0 ? "next" : "prev";
      var link = step && document.querySelector("a[rel=\"" + rel + "\"]");
      if (link) {
        e.preventDefault();
        window.location.href = link.href;
      }
    });
  }

  function readViews(links) {
    var views = [];
    for (var i = 0; i < links.length; i++) {
      views.push({ stem: leaf(links[i].getAttribute("href")).slice(1, -4),
                   note: links[i].getAttribute("title") || "",
                   has: " " + (links[i].className || "") + " " });
    }
    return views;
  }

  function readPresets(links) {
    var presets = [];
    for (var i = 0; i < links.length; i++) {
      presets.push({ letter: leaf(links[i].getAttribute("href")).charAt(0),
                     name: links[i].textContent, title: links[i].getAttribute("title") || "" });
    }
    if (!presets.length) { presets.push({ letter: "A", name: "", title: "" }); }
    return presets;
  }

  /* The series page: #viewer becomes a stack viewer over the frames listed in #images. */
  function Viewer(box, list) {
    var views = readViews(list.getElementsByTagName("a"));
    var presets = readPresets(box.querySelectorAll(".presets a"));
    var state = { index: 0, preset: 0, wheel: 0 };
    var ui = make("div", "viewer pdi-on");
    var stage = make("div", "pdi-stage");
    var link = make("a");
    var img = make("img", "pdi-img");
    var bottomLeft = make("div", "pdi-ov pdi-bl");
    var position = make("span", "pdi-pos");
    var note = make("span", "pdi-note");
    var bottomRight = make("div", "pdi-ov pdi-br");
    var bar = make("div", "pdi-bar");
    var prev = make("button", "pdi-prev", "\u2039");
    var next = make("button", "pdi-next", "\u203a");
    var slider = make("input", "pdi-slider");
    var counter = make("span", "pdi-count");
    var buttons = [];

    ui.id = "viewer";
    ui.setAttribute("tabindex", "-1");
    img.alt = "";
    link.appendChild(img);
    stage.appendChild(link);
    stage.appendChild(make("div", "pdi-ov pdi-tl", textOf("ov-patient")));
    stage.appendChild(make("div", "pdi-ov pdi-tr", textOf("ov-study")));
    bottomLeft.appendChild(position);
    bottomLeft.appendChild(make("br"));
    bottomLeft.appendChild(note);
    stage.appendChild(bottomLeft);
    stage.appendChild(bottomRight);
    prev.type = next.type = "button";
    prev.title = T.previous;
    next.title = T.next;
    slider.type = "range";
    slider.min = "1";
    slider.max = String(views.length);
    slider.step = "1";
    slider.value = "1";
    slider.setAttribute("aria-label", T.slider);
    bar.appendChild(prev);
    bar.appendChild(slider);
    bar.appendChild(next);
    bar.appendChild(counter);
    ui.appendChild(stage);
    ui.appendChild(bar);
    if (presets.length > 1) {
      var row = make("p", "pdi-presets", T.window + ": ");
      for (var i = 0; i < presets.length; i++) {
        var button = make("button", "preset", (i < 9 ? (i + 1) + " \u00b7 " : "") + presets[i].name);
        button.type = "button";
        button.title = presets[i].title;
        button.onclick = choose(i);
        buttons.push(button);
        row.appendChild(button);
      }
      ui.appendChild(row);
    }
    ui.appendChild(make("p", "pdi-help", T.help));

    function choose(i) {
      return function () { setPreset(i); };
    }

    function file(view, letter, ext) {
      return letter + view.stem + ext;
    }

    function shownLetter(view) {
      var letter = presets[state.preset].letter;
      return letter === "A" || view.has.indexOf(" has-" + letter + " ") >= 0 ? letter : "A";
    }

    function preload(i) {
      if (i >= 0 && i < views.length) {
        var image = new Image();
        image.src = file(views[i], shownLetter(views[i]), ".JPG");
      }
    }

    function show(i) {
      state.index = Math.max(0, Math.min(views.length - 1, i));
      var view = views[state.index];
      var preset = presets[state.preset];
      var pos = fmt(T.image_of, { n: state.index + 1, count: views.length });
      img.src = file(view, shownLetter(view), ".JPG");
      img.alt = pos;
      link.href = file(view, preset.letter, ".HTM");
      position.textContent = pos;
      note.textContent = view.note;
      counter.textContent = pos;
      bottomRight.textContent = preset.name + (preset.title ? " \u00b7 " + preset.title : "");
      slider.value = String(state.index + 1);
      prev.disabled = state.index === 0;
      next.disabled = state.index === views.length - 1;
      preload(state.index + 1);
      preload(state.index - 1);
    }

    function setPreset(i) {
      if (i < 0 || i >= presets.length) { return; }
      state.preset = i;
      for (var b = 0; b < buttons.length; b++) {
        buttons[b].className = b === i ? "preset current" : "preset";
      }
      show(state.index);
    }

    function onKey(e) {
      if (modified(e) || typing(e.target)) { return; }
      var step = STEP[e.key];
      if (step) {
        show(state.index + step);
      } else if (e.key === "Home" || e.key === "End") {
        show(e.key === "Home" ? 0 : views.length - 1);
      } else if (/^[1-9]$/.test(e.key) && Number(e.key) <= presets.length) {
        setPreset(Number(e.key) - 1);
      } else {
        return;
      }
      e.preventDefault();
    }

    function onWheel(e) {
      e.preventDefault();
      state.wheel += e.deltaY * (e.deltaMode === 1 ? 33 : e.deltaMode === 2 ? 400 : 1);
      if (Math.abs(state.wheel) >= 40) {
        show(state.index + (state.wheel > 0 ? 1 : -1));
        state.wheel = 0;
      }
    }

    function onListClick(e) {
      var target = e.target;
      if (modified(e) || e.button !== 0 || !target || target.tagName !== "A") { return; }
      var n = Number(target.textContent);
      if (n >= 1 && n <= views.length) {
        e.preventDefault();
        show(n - 1);
        ui.scrollIntoView();
      }
    }

    prev.onclick = function () { show(state.index - 1); };
    next.onclick = function () { show(state.index + 1); };
    slider.addEventListener("input", function () { show(Number(slider.value) - 1); });
    stage.addEventListener("wheel", onWheel, { passive: false });
    document.addEventListener("keydown", onKey);
    list.addEventListener("click", onListClick);
    if (buttons.length) { buttons[0].className = "preset current"; }
    show(0);
    box.parentNode.replaceChild(ui, box);
    document.documentElement.className += " pdi-js";
  }

  function start() {
    try {
      var box = document.getElementById("viewer");
      var list = document.getElementById("images");
      if (box && list && list.getElementsByTagName("a").length) {
        Viewer(box, list);
      } else if (document.querySelector("a[rel=\"next\"], a[rel=\"prev\"]")) {
        pageKeys();
      }
    } catch (err) {
      if (window.console) { window.console.warn("VIEWER.JS: " + err); }
    }
  }

  try {
    addStyle();
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", start);
    } else {
      start();
    }
  } catch (err) {
    if (window.console) { window.console.warn("VIEWER.JS: " + err); }
  }
}());
