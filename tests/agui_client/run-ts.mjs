// Type-checks a TypeScript example (docs/api.md) against the installed @ag-ui/client, then runs it.
//   node run-ts.mjs path/to/example.ts
// The example is copied beside node_modules (into .examples/) so that its imports resolve as in a project.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import ts from "typescript";

const here = dirname(fileURLToPath(import.meta.url));
const dir = join(here, ".examples");
mkdirSync(dir, { recursive: true });
const source = join(dir, basename(process.argv[2]));
copyFileSync(process.argv[2], source);

const program = ts.createProgram([source], {
  strict: true,
  noEmit: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  types: ["node"],
  typeRoots: [join(here, "node_modules", "@types")],
  skipLibCheck: true,
});
const problems = ts.getPreEmitDiagnostics(program);
if (problems.length) {
  const host = { getCanonicalFileName: (f) => f, getCurrentDirectory: () => dir, getNewLine: () => "\n" };
  process.stderr.write(ts.formatDiagnostics(problems, host));
  process.exit(2);
}
const { outputText } = ts.transpileModule(readFileSync(source, "utf8"), {
  compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
});
const compiled = source.replace(/\.ts$/, ".mjs");
writeFileSync(compiled, outputText);
await import(pathToFileURL(compiled).href);
