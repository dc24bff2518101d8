import { Time } from '@jupyterlab/coreutils';
import { TranslationBundle } from '@jupyterlab/translation';
import {
  caretDownIcon,
  caretRightIcon,
  ReactWidget,
  runIcon,
  UseSignal
} from '@jupyterlab/ui-components';
import * as React from 'react';

import { EnvironmentsModel } from './model';
import { IEnvironment } from './request';
import {
  formatBytes,
  packageCount,
  problemText,
  progressParts,
  remainingSeconds,
  State,
  stateOf,
  summarize
} from './state';

/** Above this many environments the panel shows a filter box. */
export const FILTER_THRESHOLD = 6;

/** What a row's actions do; provided by the plugin (kernels, documents, dialogs). */
export interface IEnvironmentActions {
  openNotebook(env: IEnvironment): void;
  stage(env: IEnvironment): void;
  evict(env: IEnvironment): void;
  shutDownKernels(env: IEnvironment): void;
  /** How many kernels of this server run `env` (they can be shut down from here). */
  runningKernels(env: IEnvironment): number;
}

function stateLabel(
  env: IEnvironment,
  state: State,
  trans: TranslationBundle
): string {
  const pending = (env.slurm_jobs ?? []).find(job => job.state === 'PENDING');
  if (pending) {
    return trans.__('queued: %1', pending.reason || 'Pending');
  }
  switch (state) {
    case 'ready':
      return env.staged?.in_use ? trans.__('in use') : trans.__('ready');
    case 'evicting':
      return trans.__('evicting…');
    case 'starting':
      return env.staging && !env.staging.error
        ? stagingLabel(env, trans)
        : trans.__('starting…');
    case 'failed':
      return trans.__('failed');
    case 'problem':
      return trans.__('problem');
    case 'staging':
      return stagingLabel(env, trans);
    default:
      return trans.__('not staged');
  }
}

function stagingLabel(env: IEnvironment, trans: TranslationBundle): string {
  const fraction = env.staging?.fraction;
  return fraction === null || fraction === undefined
    ? trans.__('staging…')
    : trans.__('staging %1 %', Math.floor(fraction * 100));
}

/** "37 % · 70.2 MB of 190 MB · 12 s · about 20 s left" */
export function progressText(
  env: IEnvironment,
  trans: TranslationBundle
): string {
  const staging = env.staging;
  if (!staging) {
    return '';
  }
  const parts = progressParts(
    {
      ...staging,
      left: remainingSeconds(staging.fraction, staging.elapsed)
    },
    trans
  );
  return parts.join(' · ') || trans.__('starting to unpack…');
}

function Details(props: {
  env: IEnvironment;
  state: State;
  trans: TranslationBundle;
}): JSX.Element {
  const { env, state, trans } = props;
  const facts: string[] = [];
  if (env.archive_size !== null) {
    facts.push(trans.__('%1 archive', formatBytes(env.archive_size)));
  }
  if (env.python_version) {
    facts.push(trans.__('Python %1', env.python_version));
  }
  const packages = packageCount(env);
  if (packages !== null) {
    facts.push(trans._n('%1 package', '%1 packages', packages));
  }
  const problem = problemText(env);
  return (
    <div className="jp-kernelprov-details">
      {facts.length > 0 && (
        <p className="jp-kernelprov-facts">{facts.join(' · ')}</p>
      )}
      {problem && (
        <p className="jp-kernelprov-problem">
          {state === 'failed' && env.last_failure && !env.staging?.error
            ? trans.__(
                'The last start failed %1: %2',
                Time.formatHuman(new Date(env.last_failure.at * 1000)),
                problem
              )
            : problem}
        </p>
      )}
      {env.staging && !env.staging.error && !env.staged && (
        <div className="jp-kernelprov-progress">
          <progress
            max={100}
            value={
              env.staging.fraction === null
                ? undefined
                : Math.floor(env.staging.fraction * 100)
            }
            aria-label={trans.__('Staging progress of %1', env.display_name)}
          />
          <span className="jp-kernelprov-progressText">
            {progressText(env, trans)}
          </span>
        </div>
      )}
      {(env.slurm_jobs ?? []).map(job => (
        <p key={job.kernel_id} className="jp-kernelprov-slurmJob">
          {trans.__('Slurm job %1: %2', job.job_id, job.description)}
        </p>
      ))}
      {env.slurm_jobs && (
        <p className="jp-kernelprov-facts">
          {trans.__(
            'Runs in a Slurm job; its env is staged on the compute node.'
          )}
        </p>
      )}
      {env.staged && (
        <p className="jp-kernelprov-staged" title={env.staged.prefix}>
          {[
            trans.__('%1 on this node', formatBytes(env.staged.bytes)),
            env.staged.used === false
              ? trans.__(
                  'staged %1, not used yet',
                  Time.formatHuman(new Date(env.staged.staged_at * 1000))
                )
              : trans.__(
                  'last used %1',
                  Time.formatHuman(new Date(env.staged.last_used * 1000))
                ),
            ...(env.staged.in_use
              ? [
                  trans._n(
                    'in use by %1 kernel',
                    'in use by %1 kernels',
                    env.staged.in_use
                  )
                ]
              : [])
          ].join(' · ')}
          <br />
          <code className="jp-kernelprov-path">{env.staged.prefix}</code>
        </p>
      )}
    </div>
  );
}

function Actions(props: {
  env: IEnvironment;
  state: State;
  model: EnvironmentsModel;
  actions: IEnvironmentActions;
  trans: TranslationBundle;
}): JSX.Element {
  const { env, state, model, actions, trans } = props;
  const busy = model.busyWith(env.name) !== undefined;
  const offline = !model.connected;
  const who = env.display_name;
  const offlineWhy = trans.__(
    'The server is not answering; try again once it is back.'
  );
  const openWhy = offline
    ? offlineWhy
    : env.problems.length
      ? env.problems[0]
      : busy
        ? trans.__('Waiting for the server…')
        : trans.__('Open a new notebook with this kernel');
  let stageWhy = trans.__(
    'Unpack this environment onto this node now, so kernels start fast'
  );
  const slurm = env.slurm_jobs !== null && env.slurm_jobs !== undefined;
  if (offline) {
    stageWhy = offlineWhy;
  } else if (slurm) {
    stageWhy = trans.__(
      'A Slurm kernel stages on its compute node when its job starts'
    );
  } else if (env.problems.length) {
    stageWhy = env.problems[0];
  } else if (state === 'ready') {
    stageWhy = trans.__('Already staged on this node');
  } else if (state === 'staging') {
    stageWhy = trans.__('Being staged right now');
  }
  const inUse = env.staged?.in_use ?? 0;
  let evictWhy = trans.__('Remove the staged copy from this node');
  if (offline) {
    evictWhy = offlineWhy;
  } else if (!env.staged) {
    evictWhy = trans.__('Nothing is staged on this node');
  } else if (inUse) {
    evictWhy = trans._n(
      'In use by %1 kernel: shut it down first',
      'In use by %1 kernels: shut them down first',
      inUse
    );
  }
  const running = actions.runningKernels(env);
  return (
    <div
      className="jp-kernelprov-actions"
      role="group"
      aria-label={trans.__('Actions for %1', who)}
    >
      <button
        type="button"
        className="jp-kernelprov-button jp-mod-accept"
        title={openWhy}
        disabled={offline || busy || env.problems.length > 0}
        onClick={() => actions.openNotebook(env)}
      >
        {trans.__('Open notebook')}
      </button>
      <button
        type="button"
        className="jp-kernelprov-button"
        title={stageWhy}
        disabled={
          offline ||
          busy ||
          slurm ||
          env.problems.length > 0 ||
          state === 'ready' ||
          state === 'staging'
        }
        onClick={() => actions.stage(env)}
      >
        {state === 'failed' ? trans.__('Retry staging') : trans.__('Stage now')}
      </button>
      <button
        type="button"
        className="jp-kernelprov-button jp-mod-warn"
        title={evictWhy}
        disabled={offline || busy || state !== 'ready' || inUse > 0}
        onClick={() => actions.evict(env)}
      >
        {trans.__('Evict')}
      </button>
      {inUse > 0 && running > 0 && (
        <button
          type="button"
          className="jp-kernelprov-button jp-mod-warn"
          title={trans.__(
            'Shut down the kernels of this server that run %1',
            who
          )}
          disabled={offline || busy}
          onClick={() => actions.shutDownKernels(env)}
        >
          {trans._n(
            'Shut down the kernel using it',
            'Shut down the %1 kernels using it',
            running
          )}
        </button>
      )}
    </div>
  );
}

function EnvironmentRow(props: {
  env: IEnvironment;
  model: EnvironmentsModel;
  actions: IEnvironmentActions;
  trans: TranslationBundle;
  expanded: boolean;
  focused: boolean;
  onToggle: () => void;
  onFocus: () => void;
  onKeyDown: (event: React.KeyboardEvent) => void;
}): JSX.Element {
  const { env, model, actions, trans, expanded } = props;
  const state = stateOf(env, model.busyWith(env.name));
  const label = stateLabel(env, state, trans);
  const detailsId = `jp-kernelprov-details-${env.name}`;
  const Caret = expanded ? caretDownIcon : caretRightIcon;
  const offline = !model.connected;
  const hint = problemText(env) ?? env.archive ?? '';
  return (
    <li
      className={`jp-kernelprov-env jp-kernelprov-mod-${state}`}
      data-kernel-name={env.name}
    >
      <div className="jp-kernelprov-rowLine">
        <button
          type="button"
          className="jp-kernelprov-row"
          aria-expanded={expanded}
          aria-controls={detailsId}
          tabIndex={props.focused ? 0 : -1}
          title={hint}
          onClick={props.onToggle}
          onFocus={props.onFocus}
          onKeyDown={props.onKeyDown}
        >
          <Caret.react tag="span" className="jp-kernelprov-caret" />
          <span className="jp-kernelprov-dot" aria-hidden="true" />
          <span className="jp-kernelprov-displayName">{env.display_name}</span>
          <span className="jp-kernelprov-state" aria-live="polite">
            {label}
          </span>
        </button>
        <button
          type="button"
          className="jp-kernelprov-open jp-Button jp-mod-minimal"
          aria-label={trans.__('Open notebook on %1', env.display_name)}
          title={trans.__('Open a new notebook with this kernel')}
          tabIndex={-1}
          disabled={
            offline ||
            env.problems.length > 0 ||
            model.busyWith(env.name) !== undefined
          }
          onClick={() => actions.openNotebook(env)}
        >
          <runIcon.react tag="span" />
        </button>
      </div>
      {expanded && (
        <div
          id={detailsId}
          className="jp-kernelprov-expanded"
          role="region"
          aria-label={trans.__('Details of %1', env.display_name)}
        >
          <Details env={env} state={state} trans={trans} />
          <Actions
            env={env}
            state={state}
            model={model}
            actions={actions}
            trans={trans}
          />
        </div>
      )}
    </li>
  );
}

function Summary(props: {
  model: EnvironmentsModel;
  trans: TranslationBundle;
}): JSX.Element | null {
  const { model, trans } = props;
  // "2 problems"; the other states read the same for any count ("3 ready", "2 not staged").
  const label = (state: string, count: number): string =>
    ({
      'in-use': trans.__('%1 in use', count),
      ready: trans.__('%1 ready', count),
      staging: trans.__('%1 staging', count),
      problem: trans._n('%1 problem', '%1 problems', count),
      'not-staged': trans.__('%1 not staged', count)
    })[state] ?? `${count} ${state}`;
  const counts = summarize(model.environments);
  if (!counts.length) {
    return null;
  }
  return (
    <p className="jp-kernelprov-summary" role="status">
      {counts.map(([state, count], i) => (
        <React.Fragment key={state}>
          {i > 0 && ' · '}
          <span className={`jp-kernelprov-count jp-kernelprov-mod-${state}`}>
            {label(state, count)}
          </span>
        </React.Fragment>
      ))}
    </p>
  );
}

function EnvironmentsList(props: {
  model: EnvironmentsModel;
  actions: IEnvironmentActions;
  trans: TranslationBundle;
}): JSX.Element {
  const { model, actions, trans } = props;
  const [filter, setFilter] = React.useState('');
  const [expanded, setExpanded] = React.useState<Set<string>>(new Set());
  const [focused, setFocused] = React.useState<string | null>(null);
  const listRef = React.useRef<HTMLUListElement>(null);
  const all = model.environments;
  const needle = filter.trim().toLowerCase();
  const shown = needle
    ? all.filter(
        env =>
          env.name.toLowerCase().includes(needle) ||
          env.display_name.toLowerCase().includes(needle) ||
          (env.python_version ?? '').includes(needle)
      )
    : all;
  const current =
    focused && shown.some(env => env.name === focused)
      ? focused
      : (shown[0]?.name ?? null);

  const toggle = (name: string) => {
    const next = new Set(expanded);
    if (next.has(name)) {
      next.delete(name);
    } else {
      next.add(name);
    }
    setExpanded(next);
  };
  const focusRow = (index: number) => {
    const env = shown[Math.max(0, Math.min(shown.length - 1, index))];
    if (!env) {
      return;
    }
    setFocused(env.name);
    const button = listRef.current?.querySelector<HTMLButtonElement>(
      `li[data-kernel-name="${CSS.escape(env.name)}"] .jp-kernelprov-row`
    );
    button?.focus();
  };
  const onKeyDown = (env: IEnvironment, index: number) => {
    return (event: React.KeyboardEvent) => {
      switch (event.key) {
        case 'ArrowDown':
          focusRow(index + 1);
          break;
        case 'ArrowUp':
          focusRow(index - 1);
          break;
        case 'Home':
          focusRow(0);
          break;
        case 'End':
          focusRow(shown.length - 1);
          break;
        case 'ArrowRight':
          if (!expanded.has(env.name)) {
            toggle(env.name);
          }
          break;
        case 'ArrowLeft':
          if (expanded.has(env.name)) {
            toggle(env.name);
          }
          break;
        case 'Enter':
          if (model.connected && !env.problems.length) {
            actions.openNotebook(env);
          }
          break;
        default:
          return;
      }
      event.preventDefault();
      event.stopPropagation();
    };
  };

  return (
    <div
      className={`jp-kernelprov-body${model.connected ? '' : ' jp-mod-disconnected'}`}
    >
      <div className="jp-kernelprov-top">
        <Summary model={model} trans={trans} />
        {all.length > FILTER_THRESHOLD && (
          <input
            type="search"
            className="jp-kernelprov-filter jp-mod-styled"
            placeholder={trans.__('Filter environments')}
            aria-label={trans.__('Filter environments')}
            value={filter}
            onChange={event => setFilter(event.target.value)}
          />
        )}
        {model.error && (
          <p
            className="jp-kernelprov-message jp-kernelprov-problem"
            role="alert"
          >
            {trans.__('Cannot list environments: %1', model.error)}
          </p>
        )}
      </div>
      {!model.loading && all.length === 0 && !model.error && (
        <p className="jp-kernelprov-message">
          {trans.__(
            'No packed environments yet. Add one in a terminal with `kernelprov install NAME`.'
          )}
        </p>
      )}
      {shown.length > 0 && (
        <ul
          className="jp-kernelprov-list"
          aria-label={trans.__('Packed environments')}
          ref={listRef}
        >
          {shown.map((env, index) => (
            <EnvironmentRow
              key={env.name}
              env={env}
              model={model}
              actions={actions}
              trans={trans}
              expanded={expanded.has(env.name)}
              focused={env.name === current}
              onToggle={() => toggle(env.name)}
              onFocus={() => setFocused(env.name)}
              onKeyDown={onKeyDown(env, index)}
            />
          ))}
        </ul>
      )}
      {needle && shown.length === 0 && all.length > 0 && (
        <p className="jp-kernelprov-message">
          {trans.__('No environment matches “%1”.', filter)}
        </p>
      )}
      {model.cacheDir && (
        <p className="jp-kernelprov-footer">
          {trans.__('Staged under %1', model.cacheDir)}
        </p>
      )}
    </div>
  );
}

/**
 * The list of environments, re-rendered whenever the model changes.
 */
export class EnvironmentsView extends ReactWidget {
  constructor(
    model: EnvironmentsModel,
    actions: IEnvironmentActions,
    trans: TranslationBundle
  ) {
    super();
    this.addClass('jp-kernelprov-view');
    this._model = model;
    this._actions = actions;
    this._trans = trans;
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => (
          <EnvironmentsList
            model={this._model}
            actions={this._actions}
            trans={this._trans}
          />
        )}
      </UseSignal>
    );
  }

  private _actions: IEnvironmentActions;
  private _model: EnvironmentsModel;
  private _trans: TranslationBundle;
}
