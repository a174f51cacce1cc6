// Downloads page: over http(s), put this site's address where the snippets say BASE, so
// each one reads the published files as it is. Text only (textContent), never HTML.
(function () {
  "use strict";
  if (!/^https?:$/.test(location.protocol)) return;
  var base = new URL(".", document.baseURI).href.replace(/\/$/, "");
  var shown = document.getElementById("site-base");
  if (shown) shown.textContent = base + "/";
  document.querySelectorAll("pre").forEach(function (pre) {
    pre.textContent = pre.textContent.split("BASE/").join(base + "/");
  });
})();
