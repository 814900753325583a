// Validates Akash SDL files: Akash's own validator (`validateSDL` and `generateManifest` of
// @akashnetwork/chain-sdk, for mainnet), then the rules that validator leaves to Akash's Go parser,
// then shmback's own rules for its deployments.
//
//   node validate-sdl.mjs FILE...           every FILE must pass
//   node validate-sdl.mjs --expect-fail FILE...
//       every FILE must fail, with an error containing the text of its `# expect: TEXT` line
//
// Exit status 0 when every file did what was expected, 1 otherwise.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { validateSDL, generateManifest } from "@akashnetwork/chain-sdk";
import yaml from "js-yaml";

const ALLOWED_CLASSES = new Set(["default", "beta1", "beta2", "beta3", "ram"]);
// shmback's engine peak RSS: 196 MiB measured sending 384 MB to S3 with 4 uploads in flight
// (BENCHMARKS.md); a service running `shmback run` needs at least this beyond its ram volumes.
const SHMBACK_RUN_MIB = 256;

const UNITS = { k: 1e3, m: 1e6, g: 1e9, t: 1e12, ki: 2 ** 10, mi: 2 ** 20, gi: 2 ** 30, ti: 2 ** 40 };
function bytes(size) {
  const m = /^([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)$/.exec(String(size).trim());
  if (!m) throw new Error(`unreadable size "${size}"`);
  const unit = m[2].toLowerCase().replace(/b$/, "");
  if (unit !== "" && !(unit in UNITS)) throw new Error(`unknown size unit in "${size}"`);
  return Number(m[1]) * (unit === "" ? 1 : UNITS[unit]);
}

const asArray = (v) => (v === undefined || v === null ? [] : Array.isArray(v) ? v : [v]);
const truthy = (v) => v === true || String(v).toLowerCase() === "true";

// The rules Akash's Go parser (go/sdl: storage.go, v2_1.go) enforces and the TypeScript validator
// does not, and the ones a shmback deployment needs.
function extraRules(sdl) {
  const errors = [];
  for (const [name, service] of Object.entries(sdl.services ?? {})) {
    for (const [placement, d] of Object.entries(sdl.deployment?.[name] ?? {})) {
      const profile = sdl.profiles?.compute?.[d.profile];
      if (!profile) continue; // Akash's validator reports it
      const where = `services.${name} (profile ${d.profile}, placement ${placement})`;
      const volumes = asArray(profile.resources?.storage).map((v) => ({ ...v, name: v.name ?? "default" }));
      const params = service.params?.storage ?? {};
      const seen = new Set();
      let ramBytes = 0;
      const ramMounts = [];
      for (const v of volumes) {
        if (seen.has(v.name)) errors.push(`${where}: volume name "${v.name}" is used twice in the profile`);
        seen.add(v.name);
        const cls = v.attributes?.class;
        const persistent = truthy(v.attributes?.persistent);
        if (cls !== undefined && !ALLOWED_CLASSES.has(cls))
          errors.push(`${where}: volume "${v.name}" has storage class "${cls}"; Akash knows ${[...ALLOWED_CLASSES].join(", ")}`);
        if (cls === "ram") {
          if (persistent) errors.push(`${where}: ram volume "${v.name}" is persistent; a ram volume never is (drop persistent)`);
          const p = params[v.name];
          if (!p?.mount) errors.push(`${where}: ram volume "${v.name}" is not mounted (params.storage.${v.name}.mount, e.g. /dev/shm)`);
          if (p?.readOnly === true) errors.push(`${where}: ram volume "${v.name}" is readOnly; Akash refuses readOnly for class ram`);
          if (p?.mount) ramMounts.push(p.mount.replace(/\/+$/, ""));
          ramBytes += bytes(v.size);
        } else if (cls !== undefined && !persistent) {
          errors.push(`${where}: volume "${v.name}" sets class "${cls}" but is not persistent; Akash allows a class on an ephemeral volume only for ram`);
        }
      }
      const memory = bytes(profile.resources?.memory?.size ?? 0);
      const words = [...asArray(service.command), ...asArray(service.args)].join(" ");
      const runsUploader = /\bshmback\s+run\b/.test(words);
      const need = ramBytes + (runsUploader ? SHMBACK_RUN_MIB * 2 ** 20 : 0);
      if (memory <= need)
        errors.push(`${where}: memory ${profile.resources?.memory?.size} is not above ${need / 2 ** 20} MiB (ram volumes count against it${runsUploader ? `, plus ${SHMBACK_RUN_MIB} MiB for shmback run` : ""})`);
      if (runsUploader) {
        for (const m of words.matchAll(/--segment[ =]+(\S+)/g)) {
          const dir = m[1].replace(/\/[^/]*$/, "") || "/";
          if (!ramMounts.includes(dir))
            errors.push(`${where}: --segment ${m[1]} needs a ram volume mounted at ${dir} (found ${ramMounts.join(", ") || "none"})`);
        }
        const listen = /--listen[ =]+\S*:([0-9]+)/.exec(words);
        if (listen) {
          for (const e of asArray(service.expose)) {
            if (String(e.port) === listen[1] && asArray(e.to).some((t) => t.global === true || t.ip))
              errors.push(`${where}: the --listen port ${listen[1]} is exposed globally; expose it only to the producing services (to: - service: NAME)`);
          }
        }
        const metrics = /--metrics-addr[ =]+\S*:([0-9]+)/.exec(words);
        if (metrics) {
          for (const e of asArray(service.expose)) {
            if (String(e.port) === metrics[1] && asArray(e.to).some((t) => t.global === true || t.ip))
              errors.push(`${where}: the --metrics-addr port ${metrics[1]} is exposed globally (it has no token); expose it only to a Prometheus service of the deployment (to: - service: NAME)`);
          }
        }
      }
    }
  }
  return errors;
}

function check(file) {
  const text = readFileSync(file, "utf8");
  let sdl;
  try {
    sdl = yaml.load(text);
  } catch (e) {
    return { errors: [`not YAML: ${e.message}`], text };
  }
  const errors = [];
  for (const e of validateSDL(sdl, "mainnet") ?? []) errors.push(`akash: ${e.message}${e.instancePath ? ` at ${e.instancePath}` : ""}`);
  if (errors.length === 0) {
    const manifest = generateManifest(sdl, "mainnet");
    if (!manifest.ok) for (const e of manifest.value) errors.push(`akash manifest: ${e.message}`);
  }
  for (const e of extraRules(sdl)) errors.push(`rule: ${e}`);
  return { errors, text };
}

const args = process.argv.slice(2);
const expectFail = args[0] === "--expect-fail";
const files = expectFail ? args.slice(1) : args;
if (files.length === 0) {
  console.error("usage: node validate-sdl.mjs [--expect-fail] FILE...");
  process.exit(2);
}
let passed = 0;
let failed = 0;
for (const file of files) {
  const { errors, text } = check(file);
  if (!expectFail) {
    if (errors.length === 0) {
      passed++;
      console.log(`ok    ${file}`);
    } else {
      failed++;
      console.log(`FAIL  ${file}\n${errors.map((e) => `      ${e}`).join("\n")}`);
    }
    continue;
  }
  const expected = /^# expect: (.+)$/m.exec(text)?.[1]?.trim();
  if (!expected) {
    failed++;
    console.log(`FAIL  ${file}: a bad sample needs a "# expect: TEXT" line`);
  } else if (errors.some((e) => e.includes(expected))) {
    passed++;
    console.log(`ok    ${basename(file)} refused: ${errors.find((e) => e.includes(expected))}`);
  } else {
    failed++;
    console.log(`FAIL  ${file}: expected an error containing "${expected}", got ${errors.length ? errors.join(" | ") : "none"}`);
  }
}
console.log(`sdl: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
