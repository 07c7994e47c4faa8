// Markdown while a message streams, and maths everywhere (window.ChorusMarkdown).
//
// A streaming message's text is rendered as Markdown in the page (markdown-it), sanitised (DOMPurify, with the
// server's allow-list), at most once per animation frame however fast tokens come. An unclosed code fence is
// code until it closes (CommonMark runs it to the end of the text). When the message completes, the server's
// sanitised HTML replaces it (agents_app/domain/rendering.py): that stays the reference, with its colours.
// Maths: both renderers turn `$...$` and `$$...$$` into <span class="math-inline|math-display"> holding the
// TeX as text, and typeset() renders those spans with KaTeX, for streamed and server HTML alike.
// No inline style: KaTeX builds its nodes with the DOM and sets sizes through element.style, which the
// Content-Security-Policy allows (it refuses style attributes in markup, which DOMPurify drops anyway).
(function () {
  "use strict";

  // The server's allow-list (agents_app/domain/rendering.py), so a streamed message shows what its final HTML will.
  const TAGS = ["p", "br", "hr", "em", "strong", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span", "div"];
  const CLASSES = new Set(["highlight", "filename", "math-inline", "math-display"]);
  const BARE_TAG = /^<\/?([a-z][a-z0-9]*)\s*\/?>$/i;
  const MATH = "span.math-inline:not([data-tex]), span.math-display:not([data-tex])";

  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  // Pandoc's rule, as on the server: `$` opens before a non-space, closes after one and not before a digit,
  // so "$5 and $10" stays text. Display maths `$$...$$` may span lines; neither holds a `$`.
  function mathRule(state, silent) {
    const src = state.src;
    const start = state.pos;
    if (src.charCodeAt(start) !== 0x24 /* $ */) return false;
    let tex;
    let display = false;
    let end;
    if (src.charCodeAt(start + 1) === 0x24) {
      end = src.indexOf("$$", start + 2);
      if (end <= start + 2) return false;
      tex = src.slice(start + 2, end);
      if (tex.includes("$")) return false;
      display = true;
      end += 2;
    } else {
      if (start > 0 && src[start - 1] === "$") return false;
      const close = src.indexOf("$", start + 1);
      if (close < 0) return false;
      tex = src.slice(start + 1, close);
      if (!tex || /\s/.test(tex[0]) || tex.includes("\n")) return false;
      if (tex.length > 1 && /[\s\\]/.test(tex[tex.length - 1])) return false;
      if (/[\d$]/.test(src[close + 1] || "")) return false;
      end = close + 1;
    }
    if (!silent) {
      const token = state.push(display ? "math_display" : "math_inline", "span", 0);
      token.content = tex.trim();
    }
    state.pos = end;
    return true;
  }

  function createRenderer() {
    const md = window.markdownit({ html: true, linkify: false, typographer: false });
    md.inline.ruler.after("escape", "math", mathRule);
    md.renderer.rules.math_inline = (tokens, i) => `<span class="math-inline">${escapeHtml(tokens[i].content)}</span>`;
    md.renderer.rules.math_display = (tokens, i) => `<span class="math-display">${escapeHtml(tokens[i].content)}</span>`;
    // No attribute the model wrote reaches even DOMPurify's parser: Chromium checks the CSP while parsing, so
    // an `onerror` or a `style` would be reported (and blocked) there. Raw HTML passes only as bare tags of the
    // allow-list (`<br>`, `</strong>`); anything else is shown as text until the server's HTML replaces it.
    // Images are not rendered (the server drops them too), so nothing is fetched. A table column's alignment
    // becomes `align`, as on the server, instead of a style attribute.
    md.disable("image");
    md.renderer.rules.html_block = (tokens, i) => escapeHtml(tokens[i].content);
    md.renderer.rules.html_inline = (tokens, i) => {
      const tag = BARE_TAG.exec(tokens[i].content);
      return tag && TAGS.includes(tag[1].toLowerCase()) ? tokens[i].content : escapeHtml(tokens[i].content);
    };
    ["th_open", "td_open"].forEach((name) => {
      md.renderer.rules[name] = (tokens, i, options, env, self) => {
        const token = tokens[i];
        const align = /text-align:\s*(left|center|right)/.exec(token.attrGet("style") || "");
        token.attrs = (token.attrs || []).filter(([key]) => key !== "style");
        if (align) token.attrSet("align", align[1]);
        return self.renderToken(tokens, i, options);
      };
    });
    // The same shape as the server's code blocks (Pygments' wrapper and language label), without colours.
    md.renderer.rules.fence = (tokens, i) => {
      const token = tokens[i];
      const language = token.info.trim().split(/\s+/)[0].slice(0, 30);
      const label = language && language !== "text" ? `<span class="filename">${escapeHtml(language)}</span>` : "";
      return `<div class="highlight">${label}<pre><code>${escapeHtml(token.content)}</code></pre></div>\n`;
    };
    return md;
  }

  let markdown = null;
  let hooked = false;

  function sanitise(html) {
    if (!hooked) {
      hooked = true;
      // Classes: only the renderers' own, never one the model wrote to borrow the page's look.
      window.DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
        if (data.attrName !== "class") return;
        const kept = data.attrValue.split(/\s+/).filter((name) => CLASSES.has(name));
        if (kept.length) data.attrValue = kept.join(" ");
        else data.keepAttr = false;
      });
      window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
        if (node.tagName === "A") node.setAttribute("rel", "noopener noreferrer nofollow");
      });
    }
    return window.DOMPurify.sanitize(html, {
      ALLOWED_TAGS: TAGS,
      ALLOWED_ATTR: ["href", "title", "align", "class"],
    });
  }

  // Markdown text -> sanitised HTML (maths left as spans for typeset()).
  function render(text) {
    if (!markdown) markdown = createRenderer();
    return sanitise(markdown.render(text));
  }

  // Typeset every maths span under root not yet typeset. Bad TeX stays as the text that was written.
  function typeset(root) {
    if (!window.katex || !root || !root.querySelectorAll) return;
    const spans = root.matches && root.matches(MATH) ? [root] : root.querySelectorAll(MATH);
    spans.forEach((span) => {
      const tex = span.textContent;
      const display = span.classList.contains("math-display");
      span.dataset.tex = tex;
      try {
        window.katex.render(tex, span, { displayMode: display, throwOnError: true, output: "htmlAndMathml" });
      } catch (error) {
        span.textContent = display ? `$$${tex}$$` : `$${tex}$`;
        span.classList.add("math-error");
        span.title = String(error.message || error);
      }
    });
  }

  // A content element's stream: {text, frame, timer, nextAt, shown}; `shown` is the element's first child as
  // last rendered here, so a frame that finds another (the server's HTML came first) leaves the element alone.
  // Rendering re-parses the whole text: a long answer whose rendering takes a while is re-rendered less often
  // (after four times as long as the last rendering took), so the page stays responsive.
  const streams = new WeakMap();

  function paint(el, stream) {
    stream.frame = 0;
    if (streams.get(el) !== stream || el.firstChild !== stream.shown) return;
    const started = performance.now();
    el.innerHTML = render(stream.text);
    typeset(el);
    stream.shown = el.firstChild;
    const now = performance.now();
    stream.nextAt = now + 4 * (now - started);
  }

  function schedule(el, stream) {
    if (stream.frame || stream.timer) return;
    const wait = stream.nextAt - performance.now();
    if (wait <= 0) {
      stream.frame = window.requestAnimationFrame(() => paint(el, stream));
      return;
    }
    stream.timer = window.setTimeout(() => {
      stream.timer = 0;
      schedule(el, stream);
    }, wait);
  }

  // Add a token to a streaming message's content element; it is re-rendered on a coming animation frame.
  function append(el, delta) {
    let stream = streams.get(el);
    if (!stream) {
      stream = { text: "", frame: 0, timer: 0, nextAt: 0, shown: el.firstChild };
      streams.set(el, stream);
    }
    stream.text += delta;
    schedule(el, stream);
  }

  // The message is complete and its server HTML is in place: forget the stream, typeset its maths.
  function settle(el) {
    const stream = streams.get(el);
    if (stream && stream.frame) window.cancelAnimationFrame(stream.frame);
    if (stream && stream.timer) window.clearTimeout(stream.timer);
    streams.delete(el);
    typeset(el);
  }

  // Server HTML that arrives by any path (history, a replaced draft, pages other code fills) gets its maths.
  function watch() {
    typeset(document.body);
    new MutationObserver((records) => {
      records.forEach((record) => record.addedNodes.forEach((node) => {
        if (node.nodeType === Node.ELEMENT_NODE && !node.closest(".katex")) typeset(node);
      }));
    }).observe(document.body, { childList: true, subtree: true });
  }

  window.ChorusMarkdown = { append, settle, render, typeset };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", watch);
  else watch();
})();
