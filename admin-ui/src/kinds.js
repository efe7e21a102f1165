// The resource kinds, as the API's paths and policy documents name them
// (`Kind::plural` in prism-proto). No browser APIs here: the unit tests
// import it under Node.

export const KINDS = [
  { plural: 'namespaces', kind: 'Namespace', title: 'Namespaces' },
  { plural: 'backends', kind: 'Backend', title: 'Backends' },
  { plural: 'routes', kind: 'Route', title: 'Routes' },
  { plural: 'bindings', kind: 'DataBinding', title: 'Data bindings' },
  { plural: 'secrets', kind: 'Secret', title: 'Secrets' },
];

/** The plural (document key) of a kind such as `Route`. */
export function pluralOf(kind) {
  const found = KINDS.find((k) => k.kind === kind || k.plural === kind);
  return found ? found.plural : '';
}

/** `resource` with `name` first and the other fields after it, for people. */
export function nameFirst(resource) {
  const { name, ...rest } = resource;
  return name === undefined ? resource : { name, ...rest };
}
